"""Task sources: the embedded benchmark (`embedded`), JSON-lines tasks described by a
`spec.JsonlTask` (`jsonl`), HumanEval (`humaneval`); `builtin.register()` registers the
shipped ones (the entry points call it; importing a task module registers nothing).

Imports: runtime, models, checkpoint_io, merging, evaluation."""
