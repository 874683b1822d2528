"""Stage 1 of EmerFlow: LLM feature enrichment, precomputed offline (DESIGN §2).

Data flow: ``prompts`` (questions, parser, serialization s_i) -> ``generate``
(a local causal LM through transformers) -> ``store`` (resumable on-disk
texts + vectors) <- ``sources`` (public precomputed LLM text) ; ``encode``
(r_i = encoder(s_i)). ``pipeline`` runs these steps; ``loader`` is the single
entry point for training code: ``loader.load_item_vectors(ds, source, ...)``.

Only numpy is needed at import time: torch and transformers are imported
inside the functions that load models.
"""
