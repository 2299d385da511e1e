"""The embedded benchmark's dev split can grow without moving test or train items."""
import pytest

from recycle_jax.evaluation import task_splits
from recycle_jax.models import transformer
from recycle_jax.tasks import embedded
from recycle_jax.runtime.errors import UserError


@pytest.fixture
def dev_512():
  default = {t: embedded.items(t) for t in ("rj_code", "rj_reasoning")}
  embedded.register(512)
  task_splits.forget_splits()
  yield default
  embedded.register(embedded.DEV_BASE)
  task_splits.forget_splits()


def test_a_larger_dev_split_keeps_test_and_train_and_overlaps_neither(dev_512):
  for task, old in dev_512.items():
    new = embedded.items(task, 512)
    assert new["test"] == old["test"] and new["train"] == old["train"]
    assert len(new["dev"]) == 512 and new["dev"][:128] == old["dev"]
    prompts = lambda rows: {r["inputs"] for r in rows}
    assert len(prompts(new["dev"])) == 512
    assert not prompts(new["dev"]) & (prompts(new["train"]) | prompts(new["test"]))
  assert task_splits.materialize("rj_code", "dev", None, transformer.VOCAB).num_examples == 512


def test_a_task_with_no_items_left_refuses_a_larger_dev_split(dev_512):
  # rj_instruct's item space (1728 prompts) is all in use by dev, test and train.
  with pytest.raises(UserError, match="rj_instruct.*128 dev items that overlap neither"):
    task_splits.materialize("rj_instruct", "dev", None, transformer.VOCAB)
  assert task_splits.materialize("rj_instruct", "test", None, transformer.VOCAB).num_examples == 128
