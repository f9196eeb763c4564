"""Dense vs γ-MoD speed benchmark (`python -m launch.benchmark`).

The LLaVA-HR token layout of the paper's FLOPs setting: 1024 image + 35 system tokens +
341 text tokens = 1400. Arguments: `cpu` (default: a width a 2-core CPU runs in
minutes), `7b` (Vicuna-7B shapes, for a GPU), `gpu_7b` (launch/gpu_benchmark.sh: the 7B
shapes on one GPU, bf16 compute and parameters, cuDNN attention, no decoding), `tiny`
(seconds, for tests), plus `ratio=0.5`, `batch=N`, `dtype=bf16`, `param_dtype=bf16`,
`layers=N`, `repeats=N`, `warmup=N`, `decode=0` (prefill and training step only),
`attention=xla|cudnn`, `distill=0` (no training step with a distillation teacher),
`peak_flops=F` (MFU's peak FLOP/s per device where the table in
gamma_mod_jax/train/metrics.py lacks the device), `scan=1` (model.scan_layers: runs of
layers as lax.scan; default the plain loop), `remat=none|full|dots` (the training step's
rematerialisation, train.remat; default none), comma-separated.
"""

import ml_collections

from configs._model import parse_arg
from gamma_mod_jax.models import presets


def get_config(arg=None):
    opts = parse_arg(arg)
    size = "7b" if opts.get("7b") or opts.get("gpu_7b") else "cpu"
    c = ml_collections.ConfigDict()
    c.param_dtype = "float32"
    c.attention = None                 # jax.nn.dot_product_attention's implementation: None (XLA) or "cudnn"
    c.peak_flops_per_device = None     # None: from the device kind (train/metrics.py PEAK_BF16_FLOPS)
    if size == "7b":
        c.llm = dict(presets.VICUNA_7B)
        c.batch_size = 1
        c.dtype = "bfloat16"
        c.repeats, c.warmup = 10, 2
    else:
        c.llm = dict(presets.VICUNA_7B, hidden_size=384, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=6, num_key_value_heads=6, vocab_size=4096)
        c.batch_size = 1
        c.dtype = "float32"
        c.repeats, c.warmup = 5, 1
    if opts.get("tiny"):
        c.llm = dict(presets.TINY_LLM, num_hidden_layers=6)
        c.repeats, c.warmup = 2, 1
    if "layers" in opts:
        c.llm["num_hidden_layers"] = int(opts["layers"])
    n_layers = c.llm["num_hidden_layers"]
    c.image_tokens, c.system_tokens, c.text_tokens = (32, 4, 12) if opts.get("tiny") else (1024, 35, 341)
    # The released configs: layers 0, 1, 2 and the last stay dense.
    c.mod = dict(layers=tuple(range(3, n_layers - 1)), routing_ratio=float(opts.get("ratio", 0.5)))
    if opts.get("gpu_7b"):
        # bf16 parameters and AdamW moments: 7B x 2 bytes x 4 (weights, gradients, 2 moments)
        # = 54 GiB plus activations, on one 80 GB GPU
        c.param_dtype, c.attention = "bfloat16", "cudnn"
    c.batch_size = int(opts.get("batch", c.batch_size))
    c.dtype = opts.get("dtype", c.dtype)
    c.param_dtype = opts.get("param_dtype", c.param_dtype)
    c.attention = opts.get("attention", c.attention)
    c.repeats = int(opts.get("repeats", c.repeats))
    c.warmup = int(opts.get("warmup", c.warmup))
    if "peak_flops" in opts:
        c.peak_flops_per_device = float(opts["peak_flops"])
    c.learning_rate = 1e-5
    # A third training step: γ-MoD with distillation from the dense model (KL on the answer
    # tokens, coefficient 1), for its time and memory; 0 = not timed. Off for gpu_7b: a
    # bf16 7B teacher (13 GiB more) beside AdamW's 54 GiB would not leave room on 80 GB.
    c.distill_coef = 0.0 if opts.get("gpu_7b") or opts.get("distill") == "0" else 1.0
    c.scan_layers = opts.get("scan", "0") not in ("0", False)
    c.remat = opts.get("remat", "none")  # the training step's only (models/llama.py REMAT_POLICIES)
    # Decoding after the prompt: new tokens per example, batch sizes timed.
    c.decode_new_tokens = 8 if opts.get("tiny") else 64
    c.decode_batch_sizes = (2,) if opts.get("tiny") else (1, 8)
    if opts.get("gpu_7b") or opts.get("decode") == "0":
        c.decode_batch_sizes = ()
    return c
