"""Merging: the kernels over pytrees (`kernels`), task-vector methods (`task_vectors`),
geometric methods (`geometric`), the method registry (`methods`), search spaces of merge
weights (`spaces`), mergekit-config merges of Hugging Face folders (`hf_merge`), and the
streaming merge to disk (`streaming/`).

Imports: runtime, models, checkpoint_io."""
