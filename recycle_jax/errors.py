"""One exception type for bad input: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
  """Bad input. The message says what is wrong, where, and how to fix it."""

  def __init__(self, what: str, where: str = "", fix: str = ""):
    parts = [what]
    if where:
      parts.append(f"({where})")
    msg = " ".join(parts)
    if fix:
      msg += f"; {fix}"
    self.message = msg  # gin appends "In call to configurable ..." lines to str(e)
    super().__init__(msg)


def check(cond: bool, what: str, where: str = "", fix: str = "") -> None:
  if not cond:
    raise UserError(what, where, fix)
