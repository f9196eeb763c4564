"""Sizes of the published architectures and their tiny test twins, as plain dicts
(the `configs/` files assemble them into ml-collections configs)."""

VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096)
VICUNA_13B = dict(VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40)
CLIP_VIT_L14_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=24, num_attention_heads=16, layer_norm_eps=1e-5)
CONVNEXT_LARGE_MLP = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), layer_norm_eps=1e-6)
CONVNEXT_XXLARGE = dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), layer_norm_eps=1e-5)

# Tiny twins: same structure (GQA-free like Vicuna, same layer roles), minutes-free sizes.
TINY_LLM = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=512)
TINY_CLIP = dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, layer_norm_eps=1e-5)
TINY_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), layer_norm_eps=1e-6)

# Mini-Gemini's γ-MoD routing (Gamma-MOD's mod_mgm_llama.py), as MoDConfig options: its
# routable prefix is the image (2880 positions), half of it skips, a sequence no longer
# than the prefix keeps ceil(s / 2), xavier router init, decode always computes the layer.
MGM_MOD = dict(always_keep="all_but_image", system_tokens=0, short_sequence="half", router_init="xavier_uniform",
               decode_threshold=0.0)
# The same code on the non-HD layout (576 image tokens, sequences up to 2048): its prefix
# stays the hard-coded 2880 positions, so every sequence takes the short branch: ceil(s / 2)
# tokens kept, tokens without a label (all but answers) first (labels reach the layer under
# gradient checkpointing, as in the official script).
MGM_MOD_NO_HD = dict(MGM_MOD, always_keep="all_but_answer", num_routable_tokens=2880)
