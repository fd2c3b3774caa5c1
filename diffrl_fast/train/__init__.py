"""The trainer: needs the ``train`` extra (``pip install 'diffrl_fast[train]'``)."""
from .._extras import require_train

require_train("the trainer (diffrl_fast.train)")
