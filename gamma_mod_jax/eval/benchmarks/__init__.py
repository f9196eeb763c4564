"""The paper's benchmarks read from LLaVA's evaluation layout (`playground/data/eval/<bench>/`):
readers with each benchmark's prompt suffix (`readers`), answer and submission files
(`answers`), offline scorers (`scoring`), routing / FLOPs / speed summaries and the
paper-layout table (`report`), and the generation loop (`runner`)."""
