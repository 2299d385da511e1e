"""The model: the transformer (`transformer`, `byte_vocab`), the Hugging Face families
as mappings plus hooks (`families`), KV-cache decoding (`decoding`), mesh and sharding
rules (`partitioning`), and the training loop that builds the embedded pool (`training`).

Imports: runtime."""
