"""What a benchmark run costs (skip ratio overall and per token type, TFLOPs in the paper's
convention at the measured mean sequence length and skip) and the paper-layout table."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from gamma_mod_jax.mod.flops import paper_tflops

# The paper's nine-benchmark table, in its column order (SEED added, as LLaVA-1.5 reports it).
COLUMNS = (("textvqa", "TextVQA"), ("vqav2", "VQAv2"), ("gqa", "GQA"), ("sqa", "SQA-I"), ("pope", "POPE"),
           ("mme", "MME"), ("mmbench", "MMB"), ("seed", "SEED-I"), ("mmmu", "MMMU"), ("mmvet", "MM-Vet"),
           ("easy_vqa", "easy-VQA"))
# The paper's efficiency tables average these four.
AVERAGED = ("gqa", "sqa", "mmmu", "textvqa")


def routing_summary(metadata: Sequence[dict], model_cfg) -> dict:
    """{"mean_seq_len", "tflops_paper", and for γ-MoD models "skip_ratio" (skipped share of
    the real prompt tokens, mean over MoD layers), "skip_<type>"} over the answered prompts."""
    if not metadata:
        return {}
    mod_layers = tuple(model_cfg.mod.layers) if model_cfg.mod is not None else ()
    mean_len = sum(m["seq_len"] for m in metadata) / len(metadata)
    out = {"mean_seq_len": mean_len}
    skip = 0.0
    if mod_layers and all("tokens" in m for m in metadata):
        n_mod = len(mod_layers)
        types = sorted(metadata[0]["tokens"])
        tokens = {t: sum(m["tokens"][t] for m in metadata) for t in types}
        skipped = {t: sum(m["skipped"][t] for m in metadata) for t in types}
        skip = sum(skipped.values()) / max(n_mod * sum(tokens.values()), 1)
        out["skip_ratio"] = skip
        for t in types:
            out[f"skip_{t}"] = skipped[t] / (n_mod * tokens[t]) if tokens[t] else None
    out["tflops_paper"] = paper_tflops(model_cfg.llm, int(round(mean_len)), mod_layers, skip)
    return out


def _cell(result: Optional[dict]) -> str:
    if result is None:
        return ""
    scores = result.get("scores")
    if scores is None:
        return "files"
    return f"{scores['headline']:.1f}"


def row_figures(results: Dict[str, dict]) -> dict:
    """Headline per benchmark, the four-benchmark average (when all four ran), mean TFLOPs,
    skip and samples/s over the benchmarks in `results`."""
    figures = {name: r["scores"]["headline"] for name, r in results.items() if r.get("scores")}
    if all(n in figures for n in AVERAGED):
        figures["avg"] = sum(figures[n] for n in AVERAGED) / len(AVERAGED)

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    figures["tflops"] = mean([r["routing"].get("tflops_paper") for r in results.values()])
    figures["skip"] = mean([r["routing"].get("skip_ratio", 0.0) for r in results.values() if r["routing"]])
    figures["speed"] = mean([r.get("samples_per_s") for r in results.values()])
    return figures


def markdown_table(rows: List[tuple]) -> str:
    """rows: (model name, {benchmark: result}) in order; a difference row follows when there
    are two. Columns: the benchmarks present in the paper's order, the GQA/SQA/MMMU/TextVQA
    average, TFLOPs (paper convention, mean over the row's benchmarks), skip ratio, samples/s."""
    present = [(k, title) for k, title in COLUMNS if any(k in results for _, results in rows)]
    header = ["Model"] + [t for _, t in present] + ["Avg", "TFLOPs", "Skip", "Speed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    figures = []
    for name, results in rows:
        f = row_figures(results)
        figures.append(f)
        cells = [name] + [_cell(results.get(k)) for k, _ in present]
        cells += [f"{f['avg']:.1f}" if "avg" in f else "",
                  f"{f['tflops']:.4g}" if f["tflops"] is not None else "",
                  f"{100 * f['skip']:.1f}%" if f["skip"] is not None else "",
                  f"{f['speed']:.2f}" if f["speed"] is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) == 2:
        a, b = figures

        def diff(key, fmt="{:+.1f}", scale=1.0):
            return fmt.format(scale * (a[key] - b[key])) if a.get(key) is not None and b.get(key) is not None else ""

        cells = [f"{rows[0][0]} - {rows[1][0]}"] + [diff(k) for k, _ in present]
        cells += [diff("avg"), diff("tflops", "{:+.4g}"), diff("skip", "{:+.1f}%", 100), diff("speed", "{:+.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def vqa_result(evaluation: dict, *, tflops: float, skip_ratio: Optional[float] = None, name: str = "easy_vqa") -> dict:
    """{name: result} for `markdown_table` from a `gamma_mod_jax.eval.vqa.evaluate_vqa` result
    (exact-match accuracy as the headline, in percent) and its TFLOPs / skip ratio."""
    routing = {"tflops_paper": tflops}
    if skip_ratio is not None:
        routing["skip_ratio"] = skip_ratio
    return {name: {"scores": {"headline": 100 * evaluation["accuracy"]}, "routing": routing,
                   "samples_per_s": evaluation.get("samples_per_s")}}


def vqa_table(rows: Sequence[tuple], name: str = "easy_vqa") -> str:
    """`markdown_table` of (model name, evaluate_vqa result, TFLOPs, skip ratio or None) rows."""
    return markdown_table([(model, vqa_result(evaluation, tflops=tflops, skip_ratio=skip, name=name))
                           for model, evaluation, tflops, skip in rows])
