"""PyTorch reference of Mini-Gemini(-HD) with the ORIGINAL key names, written from
../shared/reference/mini_gemini.md (data-side views, OpenCLIP ConvNeXt stem + stages with
every stage upsampled and concatenated, patch info mining, projector), around the LLaVA
assembly of `torch_reference.py` (Vicuna from transformers, CLIP at
`model.vision_tower.vision_tower`). Test oracle only."""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.torch_reference import TorchConvNeXt, TorchLlava


def torch_views(images_aux, raw: int, grid: int, with_global: bool):
    """The original data code: `images` [B, grid*grid (+1), 3, raw, raw] (or [B, 3, raw, raw]
    without a grid) from the normalised `images_aux` [B, 3, S, S]."""
    image = F.interpolate(images_aux, size=[raw * grid, raw * grid], mode="bilinear", align_corners=False)
    if grid < 2:
        return image
    rows = []
    for one in image:  # per example, as the dataset does it
        tiles = one.reshape(3, grid, raw, grid, raw).permute(1, 3, 0, 2, 4).reshape(-1, 3, raw, raw)
        if with_global:
            glob = F.interpolate(one[None], size=[raw, raw], mode="bilinear", align_corners=False)
            tiles = torch.cat([tiles, glob], dim=0)
        rows.append(tiles)
    return torch.stack(rows)


def aux_backbone(stem, stages, images_aux):
    """OpenCLIP tower forward: stage maps, stages 1.. upsampled to stage 0 in fp32, concatenated."""
    x = stem(images_aux)
    results = []
    for stage in stages:
        x = stage.blocks(stage.downsample(x))
        results.append(x)
    size = results[0].shape[-2:]
    return torch.cat([results[0]] + [F.interpolate(r.float(), size=size, mode="bilinear", align_corners=False)
                                     .to(r.dtype) for r in results[1:]], dim=1)


def unified_resampler(model, images, images_aux):
    """Patch info mining: (tokens, mined features) as the original returns them."""
    patch_num = int(images.shape[1] ** 0.5)
    patch_size = images_aux.shape[-1] // patch_num
    a = images_aux.permute(0, 2, 3, 1)
    a = a.reshape(len(a), patch_num, patch_size, patch_num, patch_size, a.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    a = a.reshape(len(a), patch_num ** 2, patch_size ** 2, a.shape[-1])
    q = model.vlm_uni_query_projector(images)
    k = model.vlm_uni_aux_projector(a)
    v = model.vlm_uni_val_projector(a)
    att = q[:, :, None] @ (k.transpose(-1, -2) / (k.shape[-1] ** 0.5))
    return images, (att.nan_to_num().softmax(-1) @ v).mean(2)


class TorchMGM(TorchLlava):
    """MGM assembly: `model.vision_tower` (CLIP), `model.vision_tower_aux.{vision_stem,
    vision_stages}`, `model.vlm_uni_{query,aux,val}_projector`, `model.mm_projector`."""

    def __init__(self, cfg):  # cfg: our MLLMConfig with family 'mgm'
        super().__init__(dataclasses.replace(cfg, family="llava"))
        self.cfg = cfg
        conv = TorchConvNeXt(cfg.convnext.depths, cfg.convnext.dims, cfg.convnext.layer_norm_eps)
        aux = nn.Module()
        aux.vision_stem, aux.vision_stages = conv.stem, conv.stages
        model = self.lm.model
        model.vision_tower_aux = aux
        d, c = cfg.mm_hidden_size, sum(cfg.convnext.dims)
        model.vlm_uni_query_projector = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        model.vlm_uni_aux_projector = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, d))
        model.vlm_uni_val_projector = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, d))

    def state_dict_original(self):
        # timm / OpenCLIP call the ConvNeXt layer scale `gamma`.
        return {re.sub(r"(vision_stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", k): v
                for k, v in super().state_dict_original().items()}

    def vision_features(self, images_aux):
        """`encode_images` before the projector: [B, n_views * 576, d]."""
        cfg, model = self.cfg, self.lm.model
        g, glob = cfg.image_grid, cfg.image_global
        images = torch_views(images_aux, cfg.clip.image_size, g, glob)
        b = images.shape[0]
        if g > 1:
            global_images = images[:, -1:].flatten(0, 1) if glob else None
            grid_images = images[:, :-1].flatten(0, 1) if glob else images.flatten(0, 1)
            images = torch.cat([grid_images, global_images]) if glob else grid_images
        hs = model.vision_tower.vision_tower(images, output_hidden_states=True).hidden_states
        feats = hs[cfg.vision_select_layer][:, 1:]
        if glob:
            feat_global, feats = feats[-b:], feats[:-b]
        aux = aux_backbone(model.vision_tower_aux.vision_stem, model.vision_tower_aux.vision_stages, images_aux)
        if glob:
            aux_global = F.interpolate(aux.float(), scale_factor=1 / g, mode="bilinear", align_corners=False)
            feat_global, mined_global = unified_resampler(model, feat_global, aux_global)
        if g > 1:
            aux = aux.reshape(*aux.shape[:2], g, aux.shape[-2] // g, g, aux.shape[-1] // g)
            aux = aux.permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(0, 1)
        feats, mined = unified_resampler(model, feats, aux)
        if g > 1:
            feats = feats.reshape(b, g * g, *feats.shape[1:]).flatten(1, 2)
            mined = mined.reshape(b, g * g, *mined.shape[1:]).flatten(1, 2)
        if glob:
            feats, mined = torch.cat([feat_global, feats], 1), torch.cat([mined_global, mined], 1)
        return feats + mined

    def image_features(self, images_aux):
        return self.lm.model.mm_projector(self.vision_features(images_aux))
