"""Independent numpy implementations of the published math, in float64, for value tests.

They read the parameter trees of mqt_jax modules but share no code with them.
"""

from __future__ import annotations

import numpy as np


def f64(tree):
    return {k: f64(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()}


def layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def qkv(xq, xk, xv, p):
    """Per-head projections (with biases where present). x: [B, T, D]; kernels [D, heads, hd]."""
    q = np.einsum("btd,dhk->bthk", xq, p["query"]["kernel"])
    k = np.einsum("bsd,dhk->bshk", xk, p["key"]["kernel"])
    v = np.einsum("bsd,dhk->bshk", xv, p["value"]["kernel"])
    if "bias" in p["query"]:
        q, k, v = q + p["query"]["bias"], k + p["key"]["bias"], v + p["value"]["bias"]
    return q, k, v


def attention_core(q, k, v, mask=None):
    heads, kv_heads = q.shape[2], k.shape[2]
    k = np.repeat(k, heads // kv_heads, axis=2)  # HF repeat_kv
    v = np.repeat(v, heads // kv_heads, axis=2)
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    return np.einsum("bhts,bshk->bthk", softmax(logits), v)


def out_proj(o, p):
    y = np.einsum("bthk,hkd->btd", o, p["out"]["kernel"])
    return y + p["out"]["bias"] if "bias" in p["out"] else y


def layer(tree, i):
    """Slice layer i out of a scanned parameter tree."""
    return {k: layer(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def clip_vit(params, images, cfg):
    """CLIP vision transformer -> hidden state of cfg.select_layer, class token dropped."""
    p = f64(params)
    x = np.asarray(images, np.float64)
    n, s, ps = x.shape[0], cfg.image_size, cfg.patch_size
    g = s // ps
    patches = x.reshape(n, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
    kernel = p["patch_embed"]["kernel"].reshape(-1, cfg.width)  # [ps, ps, 3, D] -> [ps*ps*3, D]
    h = patches @ kernel
    cls = np.broadcast_to(p["class_embed"], (n, 1, cfg.width))
    h = np.concatenate([cls, h], 1) + p["pos_embed"]
    h = layer_norm(h, p["pre_ln"], cfg.layer_norm_eps)
    for i in range(cfg.num_layers_built):
        lp = layer(p["layers"], i)
        a = layer_norm(h, lp["ln1"], cfg.layer_norm_eps)
        h = h + out_proj(attention_core(*qkv(a, a, a, lp["attn"])), lp["attn"])
        a = layer_norm(h, lp["ln2"], cfg.layer_norm_eps)
        u = a @ lp["mlp"]["fc1"]["kernel"] + lp["mlp"]["fc1"]["bias"]
        u = u / (1 + np.exp(-1.702 * u))  # quick GELU: u * sigmoid(1.702 u)
        h = h + u @ lp["mlp"]["fc2"]["kernel"] + lp["mlp"]["fc2"]["bias"]
    return h[:, 1:]


def rms_norm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def rope_hf(x, positions, theta):
    """Hugging Face LlamaRotaryEmbedding + apply_rotary_pos_emb. x: [B, T, H, D]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    freqs = positions[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    rotate_half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


def llama(params, embeddings, positions, segment_ids, cfg, drop_at=None, keep=None):
    """LLaMA decoder on input embeddings -> logits. Causal within equal segment ids.
    drop_at=k, keep [T] bool: the positions not kept are deleted from the sequence (states,
    positions, segments) before layer k, really; returns the kept positions' logits."""
    p = f64(params)
    h = np.asarray(embeddings, np.float64)
    seg, positions = np.asarray(segment_ids), np.asarray(positions)

    def causal(seg):
        t = seg.shape[1]
        return (np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]

    mask = causal(seg)
    for i in range(cfg.num_layers):
        if i == drop_at:
            h, positions, seg = h[:, keep], positions[:, keep], seg[:, keep]
            mask = causal(seg)
        lp = layer(p["layers"], i)
        a = rms_norm(h, lp["attn_norm"]["scale"], cfg.rms_norm_eps)
        q, k, v = qkv(a, a, a, lp["attn"])
        q, k = rope_hf(q, positions, cfg.rope_theta), rope_hf(k, positions, cfg.rope_theta)
        h = h + out_proj(attention_core(q, k, v, mask), lp["attn"])
        a = rms_norm(h, lp["mlp_norm"]["scale"], cfg.rms_norm_eps)
        gate = a @ lp["mlp"]["fc1"]["kernel"]
        silu = gate / (1 + np.exp(-gate))
        h = h + (silu * (a @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["fc2"]["kernel"]
    h = rms_norm(h, p["final_norm"]["scale"], cfg.rms_norm_eps)
    return h @ p["lm_head"]["kernel"]


def bicubic_resize_torch(grid, out_size, a=-0.75):
    """Direct port of PyTorch's upsample_bicubic2d (align_corners=False), per output pixel.
    grid: [H, W, C] -> [out, out, C]."""
    h_in, w_in = grid.shape[:2]

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    out = np.zeros((out_size, out_size, grid.shape[2]))
    for oy in range(out_size):
        sy = (oy + 0.5) * h_in / out_size - 0.5
        iy = int(np.floor(sy))
        for ox in range(out_size):
            sx = (ox + 0.5) * w_in / out_size - 0.5
            ix = int(np.floor(sx))
            acc = 0.0
            for dy in range(-1, 3):
                wy = cubic(sy - (iy + dy))
                yy = min(max(iy + dy, 0), h_in - 1)
                for dx in range(-1, 3):
                    wx = cubic(sx - (ix + dx))
                    xx = min(max(ix + dx, 0), w_in - 1)
                    acc = acc + wy * wx * grid[yy, xx]
            out[oy, ox] = acc
    return out


def official_resampler(params, features, cfg, grid_size, n=None):
    """mqt.md: q = ln_q(query[:n] + pos[:n]); k = ln_k(bicubic(pos)); v = ln_v(x);
    tokens = MHA(q, k, v) @ proj."""
    p = f64(params)
    n = n or cfg.num_queries
    g = int(round(cfg.num_queries**0.5))
    x = np.asarray(features, np.float64)
    q = layer_norm(p["query"][:n] + p["pos_embed"][:n], p["ln_q"], cfg.layer_norm_eps)[None]
    pos = bicubic_resize_torch(p["pos_embed"].reshape(g, g, -1), grid_size).reshape(-1, cfg.width)
    k = layer_norm(pos, p["ln_k"], cfg.layer_norm_eps)[None]
    v = layer_norm(x, p["ln_v"], cfg.layer_norm_eps)
    q, k, v = qkv(np.broadcast_to(q, (x.shape[0],) + q.shape[1:]),
                  np.broadcast_to(k, (x.shape[0],) + k.shape[1:]), v, p["attn"])
    return out_proj(attention_core(q, k, v), p["attn"]) @ p["proj"]["kernel"]


def m3_tokens(params, features, grid_size, m):
    """M3 at m tokens, in float64: LLaVA-1.5's projector (Linear, exact GELU, Linear) on
    every patch, then torch's F.avg_pool2d with kernel = stride = grid / sqrt(m) over the
    projected grid, flattened row-major. features [N, grid**2, d] -> [N, m, D]."""
    from math import erf, isqrt

    p = f64(params)
    x = np.asarray(features, np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    x = 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    x = x @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    side = isqrt(m)
    k = grid_size // side
    grid = x.reshape(x.shape[0], side, k, side, k, -1)
    return grid.mean(axis=(2, 4)).reshape(x.shape[0], m, -1)
