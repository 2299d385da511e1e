"""Checkpoints on disk: pool manifests (`pool_manifest`), checkpoint metadata
(`checkpoint_meta`), Orbax I/O and the choice between Orbax and Hugging Face folders
(`checkpoints`), Hugging Face folders read (`hf_reader`) and written (`hf_folder`),
safetensors headers (`safetensors_io`), tokenizer files (`tokenizer_files`), mergekit
configs (`mergekit_config`), a training run's steps as a pool (`training_run`), and pool
inspection (`inspection`).

Imports: runtime, models."""
