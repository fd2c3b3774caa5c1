"""image_reward on a tiny random ImageReward checkpoint written in ImageReward.pt's own key layout, checked against an
independent plain-torch transcription of BLIP's ViT + cross-attention BERT + ImageReward's head and normalisation."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from diffrl_fast.rewards import get_reward
from diffrl_fast.rewards.clip import CLIP_MEAN, CLIP_STD, ClipImageTransform
from diffrl_fast.rewards.image_reward import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, map_image_reward_key

# tiny sizes; widths of 128 give the default 128 / 64 = 2 heads in both towers (the head split is exercised)
V_WIDTH, V_LAYERS, PATCH, IMAGE = 128, 2, 8, 32
T_WIDTH, T_LAYERS, MAX_POS = 128, 2, 40
WORDS = "a photo of cat dog red bird flying two on the beach sunset over mountains".split()
PROMPTS = ["a photo of a cat", "a red bird flying over the beach at sunset", "two dogs"]


def _tokenizer_dir(root):
    from transformers import BertTokenizer

    root.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root)
    return root, len(vocab) + 2  # + BLIP's [DEC] and [ENC]


def _tiny_image_reward_state(vocab_size, seed=0):
    """Random tensors under ImageReward.pt's names (BLIP_Pretrain + the MLP head), unused projections included."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix):
        return {f"{prefix}.weight": 1 + r(shape_of[prefix]), f"{prefix}.bias": r(shape_of[prefix])}

    sd, v = {}, "blip.visual_encoder"
    grid = IMAGE // PATCH
    sd[f"{v}.cls_token"] = r(1, 1, V_WIDTH, scale=1.0)
    sd[f"{v}.pos_embed"] = r(1, grid * grid + 1, V_WIDTH, scale=1.0)
    sd[f"{v}.patch_embed.proj.weight"] = r(V_WIDTH, 3, PATCH, PATCH)
    sd[f"{v}.patch_embed.proj.bias"] = r(V_WIDTH)
    shape_of = {}
    for i in range(V_LAYERS):
        b = f"{v}.blocks.{i}"
        for name in ("norm1", "norm2"):
            shape_of[f"{b}.{name}"] = V_WIDTH
            sd.update(ln(f"{b}.{name}"))
        sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"] = r(3 * V_WIDTH, V_WIDTH), r(3 * V_WIDTH)
        sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"] = r(V_WIDTH, V_WIDTH), r(V_WIDTH)
        sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"] = r(4 * V_WIDTH, V_WIDTH), r(4 * V_WIDTH)
        sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"] = r(V_WIDTH, 4 * V_WIDTH), r(V_WIDTH)
    shape_of[f"{v}.norm"] = V_WIDTH
    sd.update(ln(f"{v}.norm"))
    t = "blip.text_encoder"
    sd[f"{t}.embeddings.word_embeddings.weight"] = r(vocab_size, T_WIDTH, scale=1.0)
    sd[f"{t}.embeddings.position_embeddings.weight"] = r(MAX_POS, T_WIDTH, scale=1.0)
    sd[f"{t}.embeddings.position_ids"] = torch.arange(MAX_POS)[None]  # a buffer old checkpoints carry
    shape_of[f"{t}.embeddings.LayerNorm"] = T_WIDTH
    sd.update(ln(f"{t}.embeddings.LayerNorm"))
    for i in range(T_LAYERS):
        layer = f"{t}.encoder.layer.{i}"
        for kind, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            sd[f"{layer}.{kind}.self.query.weight"], sd[f"{layer}.{kind}.self.query.bias"] = r(T_WIDTH, T_WIDTH), r(T_WIDTH)
            for name in ("key", "value"):
                sd[f"{layer}.{kind}.self.{name}.weight"] = r(T_WIDTH, kv_width)
                sd[f"{layer}.{kind}.self.{name}.bias"] = r(T_WIDTH)
            sd[f"{layer}.{kind}.output.dense.weight"] = r(T_WIDTH, T_WIDTH)
            sd[f"{layer}.{kind}.output.dense.bias"] = r(T_WIDTH)
            shape_of[f"{layer}.{kind}.output.LayerNorm"] = T_WIDTH
            sd.update(ln(f"{layer}.{kind}.output.LayerNorm"))
        sd[f"{layer}.intermediate.dense.weight"], sd[f"{layer}.intermediate.dense.bias"] = r(4 * T_WIDTH, T_WIDTH), r(4 * T_WIDTH)
        sd[f"{layer}.output.dense.weight"], sd[f"{layer}.output.dense.bias"] = r(T_WIDTH, 4 * T_WIDTH), r(T_WIDTH)
        shape_of[f"{layer}.output.LayerNorm"] = T_WIDTH
        sd.update(ln(f"{layer}.output.LayerNorm"))
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = r(16, V_WIDTH), r(16)  # unused by the score
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = r(16, T_WIDTH), r(16)
    dims = [T_WIDTH, 1024, 128, 64, 16, 1]
    for i, index in enumerate((0, 2, 4, 6, 7)):
        sd[f"mlp.layers.{index}.weight"] = r(dims[i + 1], dims[i], scale=1 / math.sqrt(dims[i]) * 3)
        sd[f"mlp.layers.{index}.bias"] = r(dims[i + 1])
    return sd


def _reference_scores(sd, pixels, input_ids, attention_mask):
    """ImageReward's score written out from BLIP's definitions (vit.py, med.py) and ImageReward.py, on the raw keys."""
    def lin(x, p):
        return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def norm(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)

    def attend(q, k, v, heads, mask=None):
        B, Lq, C = q.shape
        split = lambda t: t.view(B, t.shape[1], heads, C // heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // heads)
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0  # BLIP's extended attention mask
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, Lq, C)

    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[f"{v}.cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[f"{v}.pos_embed"]
    for i in range(V_LAYERS):
        b = f"{v}.blocks.{i}"
        h = norm(x, f"{b}.norm1", 1e-6)
        q, k, vv = lin(h, f"{b}.attn.qkv").chunk(3, dim=-1)  # timm's qkv: [q | k | v] along the output
        x = x + lin(attend(q, k, vv, V_WIDTH // 64), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(norm(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image_tokens = norm(x, f"{v}.norm", 1e-6)

    t = "blip.text_encoder"
    L = input_ids.shape[1]
    h = sd[f"{t}.embeddings.word_embeddings.weight"][input_ids] + sd[f"{t}.embeddings.position_embeddings.weight"][:L]
    h = norm(h, f"{t}.embeddings.LayerNorm", 1e-12)
    heads = T_WIDTH // 64
    for i in range(T_LAYERS):
        layer = f"{t}.encoder.layer.{i}"
        a = f"{layer}.attention"
        ctx = attend(lin(h, f"{a}.self.query"), lin(h, f"{a}.self.key"), lin(h, f"{a}.self.value"), heads, attention_mask)
        h = norm(lin(ctx, f"{a}.output.dense") + h, f"{a}.output.LayerNorm", 1e-12)
        c = f"{layer}.crossattention"
        ctx = attend(lin(h, f"{c}.self.query"), lin(image_tokens, f"{c}.self.key"), lin(image_tokens, f"{c}.self.value"), heads)
        h = norm(lin(ctx, f"{c}.output.dense") + h, f"{c}.output.LayerNorm", 1e-12)
        ff = lin(F.gelu(lin(h, f"{layer}.intermediate.dense")), f"{layer}.output.dense")
        h = norm(ff + h, f"{layer}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):  # ImageReward's MLP: Linear layers, dropouts between, no activations
        r = lin(r, f"mlp.layers.{index}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_reward")
    tok_dir, vocab_size = _tokenizer_dir(root / "bert")
    sd = _tiny_image_reward_state(vocab_size)
    torch.save(sd, root / "ImageReward.pt")
    return {"checkpoint": str(root / "ImageReward.pt"), "tokenizer_path": str(tok_dir), "state": sd}


def test_image_reward_equals_the_transcribed_formula(tiny):
    from transformers import AutoTokenizer

    assert (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    fn = get_reward("image_reward", checkpoint=tiny["checkpoint"], tokenizer_path=tiny["tokenizer_path"])
    assert fn.device is None  # a reward server leaves its images on the CPU (the reward follows them)
    images = torch.rand(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    rewards, _ = fn(images, PROMPTS, [{}] * 3)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer_path"])
    tokens = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.attention_mask.sum(1).tolist() != [35] * 3 and len(set(tokens.attention_mask.sum(1).tolist())) == 3
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = _reference_scores(tiny["state"], pixels, tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(rewards, expected, rtol=1e-4, atol=1e-4)
    assert rewards.std() > 0.05, "scores should differ between images/prompts"
    # the prompt matters, and a prompt's score does not depend on the others in its batch (padding is masked)
    alone, _ = fn(images[:1], PROMPTS[:1], [{}])
    torch.testing.assert_close(alone, rewards[:1], rtol=1e-4, atol=1e-4)
    other, _ = fn(images[:1], ["two dogs on the beach"], [{}])
    assert (other - rewards[:1]).abs().item() > 1e-4
    # a non-square grey image at another size goes through resize + crop and still scores
    grey, _ = fn(torch.rand(2, 1, 40, 56), PROMPTS[:2], [{}] * 2)
    assert grey.shape == (2,) and torch.isfinite(grey).all()


def test_every_checkpoint_key_is_placed_or_the_load_fails(tiny, tmp_path):
    sd = tiny["state"]
    unused = [k for k in sd if map_image_reward_key(k) is None]
    assert sorted(unused) == sorted(["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                                     "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"])
    kwargs = {"tokenizer_path": tiny["tokenizer_path"]}
    extra = dict(sd, **{"blip.itm_head.weight": torch.zeros(2, T_WIDTH)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['blip.itm_head.weight'\]"):
        get_reward("image_reward", checkpoint=str(tmp_path / "extra.pt"), **kwargs)
    missing = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 parameters without a tensor \['text.encoder.layer.1.crossattention.self.key.bias'\]"):
        get_reward("image_reward", checkpoint=str(tmp_path / "missing.pt"), **kwargs)
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        get_reward("image_reward", checkpoint=str(tmp_path / "nowhere.pt"), **kwargs)
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        get_reward("image_reward", checkpoint=tiny["checkpoint"], tokenizer_path=str(tmp_path / "no_tokenizer"))


def test_torchvision_style_centre_crop_rounds_half_to_even():
    """torchvision's CenterCrop (ImageReward's transform) takes int(round((W - 32) / 2)); transformers' floor."""
    x = torch.rand(1, 3, 32, 39)  # (39 - 32) / 2 = 3.5: round -> 4, floor -> 3
    norm = lambda t: (t - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)  # noqa: E731
    torch.testing.assert_close(ClipImageTransform(None, 32, round_crop=True)(x, torch.float32), norm(x[..., 4:36]))
    torch.testing.assert_close(ClipImageTransform(None, 32)(x, torch.float32), norm(x[..., 3:35]))
    assert re.fullmatch(r"vision\.encoder\.layers\.3\.self_attn\.qkv\.weight",
                        map_image_reward_key("blip.visual_encoder.blocks.3.attn.qkv.weight"))
