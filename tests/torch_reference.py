"""PyTorch reference modules with the ORIGINAL LLaVA-HR / timm key names, written from
the architecture description (../shared/reference/llava_hr.md), plus LLaVA assemblies
built around transformers' CLIPVisionModel and LlamaForCausalLM. Test oracles only."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers


class TorchConvNeXtBlock(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # NCHW
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm(y))))
        return x + (y * self.weight).permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class TorchConvNeXt(nn.Module):
    def __init__(self, depths, dims, eps):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=eps))
        self.stages = nn.Sequential()
        for s, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = (nn.Identity() if s == 0 else
                                nn.Sequential(LayerNorm2d(dims[s - 1], eps=eps), nn.Conv2d(dims[s - 1], dim, 2, stride=2)))
            stage.blocks = nn.Sequential(*[TorchConvNeXtBlock(dim, eps) for _ in range(depth)])
            self.stages.append(stage)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return x


def torch_align_tokens(slow_blc, n_tokens):
    b, l, c = slow_blc.shape
    src, dst = math.isqrt(l), math.isqrt(n_tokens)
    grid = slow_blc.transpose(1, 2).reshape(b, c, src, src)
    if l < n_tokens:
        grid = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=True)
    elif l > n_tokens:
        grid = F.avg_pool2d(grid, src // dst, src // dst)
    return grid.reshape(b, c, -1).transpose(1, 2)


class TorchMRAdapter(nn.Module):
    def __init__(self, fast_dim, slow_dim, gate_hidden):
        super().__init__()
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(nn.Linear(2 * fast_dim, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, 1))

    def forward(self, fast_bnd, slow_bchw):
        b, n, d = fast_bnd.shape
        side = math.isqrt(n)
        slow = self.slow_proj(F.gelu(self.slow_conv(slow_bchw)))
        slow = torch_align_tokens(slow.reshape(b, d, -1).transpose(1, 2), n)
        fast = fast_bnd.transpose(1, 2).reshape(b, d, side, side)
        fast = fast + self.fast_proj(F.gelu(self.fast_conv(fast)))
        fast = fast.reshape(b, d, n).transpose(1, 2)
        gate = self.gate(torch.cat([fast, slow], -1).mean(1)).unsqueeze(1)
        return fast + slow * gate.tanh()


class TorchFusion(nn.Module):
    def __init__(self, fast_dim, slow_dim, out_dim):
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, out_dim)
        self.slow_proj = nn.Linear(slow_dim, out_dim)

    def forward(self, fast_bnd, slow_bchw):
        b, c = slow_bchw.shape[:2]
        slow = torch_align_tokens(slow_bchw.reshape(b, c, -1).transpose(1, 2), fast_bnd.shape[1])
        return self.fast_proj(fast_bnd) + self.slow_proj(slow)


def clip_hr_features(clip: transformers.CLIPVisionModel, pixels_nchw, fast_size, hook=None):
    """LLaVA-HR's fast branch around HF's CLIP modules: align_corners resize, patch
    embedding, antialiased bicubic position resampling, CLS dropped before pre-LN."""
    vm = clip  # transformers 5 has no `vision_model` wrapper any more
    y = F.interpolate(pixels_nchw, size=(fast_size, fast_size), mode="bilinear", align_corners=True)
    patches = vm.embeddings.patch_embedding(y).flatten(2).transpose(1, 2)
    table = vm.embeddings.position_embedding.weight[1:]
    old = math.isqrt(table.shape[0])
    new = math.isqrt(patches.shape[1])
    grid = table.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    if new != old:
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)
    pos = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    x = vm.pre_layrnorm(patches + pos)
    for i, layer in enumerate(vm.encoder.layers):
        x = layer(x, None)
        if hook is not None:
            x = hook(i, x)
    return x


def randomize_(module: nn.Module, seed: int, std: float = 0.1):
    """Every parameter gets fresh random values (norm-like 1-D weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * std + centre)


class TorchLlava(nn.Module):
    """A LLaVA-1.5 / LLaVA-HR assembly with the original state-dict keys: vision tower and
    projector under `model.`, the LLM from transformers' LlamaForCausalLM."""

    def __init__(self, cfg):  # cfg: our MLLMConfig (only sizes are read)
        super().__init__()
        llm = cfg.llm
        self.cfg = cfg
        self.lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
            num_key_value_heads=llm.kv_heads, rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
            max_position_embeddings=llm.max_position_embeddings, tie_word_embeddings=False,
            attn_implementation="eager"))
        c = cfg.clip
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
            layer_norm_eps=c.layer_norm_eps, hidden_act="quick_gelu", attn_implementation="eager"))
        tower = nn.Module()
        if cfg.family == "llava":
            tower.vision_tower = clip
        else:
            cs = cfg.convnext.dims[-1]
            tower.fast_vision_tower = nn.Module()
            tower.fast_vision_tower.vision_tower = clip
            tower.slow_vision_tower = nn.Module()
            tower.slow_vision_tower.vision_tower = TorchConvNeXt(cfg.convnext.depths, cfg.convnext.dims,
                                                                 cfg.convnext.layer_norm_eps)
            tower.align_stages_latent = nn.ModuleList([TorchMRAdapter(c.hidden_size, cs, cfg.adapter_gate_hidden)
                                                       for _ in cfg.adapter_after_layers])
            tower.align_stages = nn.ModuleList([TorchFusion(c.hidden_size, cs, cfg.mm_hidden_size)])
        self.lm.model.vision_tower = tower
        self.lm.model.mm_projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, llm.hidden_size), nn.GELU(),
                                                   nn.Linear(llm.hidden_size, llm.hidden_size))

    def state_dict_original(self):
        """The state dict under the checkpoints' key names: transformers 4 (which LLaVA's
        checkpoints were saved with) nests CLIP under `vision_model.`; transformers 5 does not."""
        out = {}
        for key, value in self.lm.state_dict().items():
            for clip_prefix in ("model.vision_tower.vision_tower.", "model.vision_tower.fast_vision_tower.vision_tower."):
                if key.startswith(clip_prefix):
                    key = clip_prefix + "vision_model." + key[len(clip_prefix):]
            out[key] = value
        return out

    def image_features(self, pixels_nchw):
        cfg, tower = self.cfg, self.lm.model.vision_tower
        if cfg.family == "llava":
            hs = tower.vision_tower(pixels_nchw, output_hidden_states=True).hidden_states
            feats = hs[cfg.vision_select_layer][:, 1:]
        else:
            slow = tower.slow_vision_tower.vision_tower(pixels_nchw)
            after = list(cfg.adapter_after_layers)

            def hook(i, x):
                return tower.align_stages_latent[after.index(i)](x, slow) if i in after else x

            fast = clip_hr_features(tower.fast_vision_tower.vision_tower, pixels_nchw, cfg.fast_image_size, hook)
            feats = tower.align_stages[0](fast, slow)
        return self.lm.model.mm_projector(feats)

    def forward(self, input_ids, attention_mask, pixels_nchw):
        """LLaVA's list-based splicing, one example at a time, then right padding.
        Returns logits [b, L, vocab] and the valid mask [b, L]."""
        feats = self.image_features(pixels_nchw)
        embed = self.lm.model.embed_tokens
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b, : int(attention_mask[b].sum())]
            where = (ids == self.cfg.image_token_index).nonzero()
            if len(where):
                p = int(where[0, 0])
                rows.append(torch.cat([embed(ids[:p]), feats[b], embed(ids[p + 1:])]))
            else:
                rows.append(embed(ids))
        length = input_ids.shape[1] - 1 + feats.shape[1]
        x = torch.zeros(len(rows), length, feats.shape[-1])
        valid = torch.zeros(len(rows), length, dtype=torch.long)
        for b, row in enumerate(rows):
            x[b, : len(row)] = row
            valid[b, : len(row)] = 1
        return self.lm(inputs_embeds=x, attention_mask=valid).logits, valid


def to_nchw(x_bhwc: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(x_bhwc).transpose(0, 3, 1, 2).copy())
