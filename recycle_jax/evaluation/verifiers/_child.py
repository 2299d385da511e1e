"""The untrusted half: runs one program and serves calls to what it defined.

Started by the harness (_harness.py) inside the sandbox as `python -I -S -c THIS_FILE
LIMITS REQUESTS_FD REPLIES_FD` (messages: JSON text in 4-byte-length frames, `send` and
`receive`). It sets the kernel limits (LIMITS: JSON {RLIMIT name: value}) on itself, reads
the program, runs it as `__main__`, replies `["ready", {name: "callable" | "value" |
"module:NAME"}]` (or `["error", text]`, `["exited", code]`), then answers `["call", name, args, kwargs]` with `["ret", value]` or
`["raise", exception name, message]` and `["value", name]` with `["ret", value]` until
the harness closes the request pipe.

Nothing here is trusted by the harness: values cross as plain data (`encode`/`decode`:
None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict; subclasses
are sent as their base type) and the harness decodes them into fresh objects, so an
object with its own `__eq__`, a patched module or a forged reply can at most send plain
values, which are compared by the harness's own code.
"""
import _json  # the json module's C half: the json package imports re, 3x the startup
import os
import sys

MAX_FRAME = 64 << 20  # bytes of one message


class NotPlain(TypeError):
  """A value that is not plain data."""


_NATIVE = (bool, float, str, type(None))  # exact types JSON writes and reads back as-is
_BIG = 1 << 63  # ints beyond: tagged hex (JSON readers cap decimal digits)


def encode(x, depth: int = 0):
  """x as a tree of JSON's types: None, bool, float, str, int and list stand for
  themselves, the rest is {"~": tag, "v": ...}. Subclasses are sent as their base type."""
  t = type(x)
  if t in _NATIVE or (t is int and -_BIG < x < _BIG):
    return x
  if depth > 100:
    raise NotPlain("nested deeper than 100")
  if t is list:
    return [v if type(v) in _NATIVE or (type(v) is int and -_BIG < v < _BIG)
            else encode(v, depth + 1) for v in x]
  for base in (bool, float, str):
    if isinstance(x, base):
      return base(x)
  if isinstance(x, int):
    x = int(x)
    return x if -_BIG < x < _BIG else {"~": "int", "v": hex(x)}
  if isinstance(x, (bytes, bytearray)):
    return {"~": "bytes", "v": bytes(x).hex()}
  if isinstance(x, complex):
    return {"~": "complex", "v": [complex(x).real, complex(x).imag]}
  items = lambda seq: [encode(v, depth + 1) for v in seq]
  if isinstance(x, list):
    return items(list(x))
  if isinstance(x, tuple):
    return {"~": "tuple", "v": items(tuple(x))}
  if isinstance(x, (set, frozenset)):
    return {"~": "frozenset" if isinstance(x, frozenset) else "set", "v": items(x)}
  if isinstance(x, dict):
    return {"~": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)]
                                for k, v in dict.items(x)]}
  raise NotPlain(f"{type(x).__name__} is not plain data")


_LEAVES = (bool, int, float, str, type(None))


def decode(t, depth: int = 0):
  """The inverse of `encode`, building only builtin types (anything else: ValueError)."""
  if type(t) in _LEAVES:
    return t
  if depth > 101:
    raise ValueError("nested deeper than 100")
  if type(t) is list:
    return [v if type(v) in _LEAVES else decode(v, depth + 1) for v in t]
  if type(t) is not dict or set(t) != {"~", "v"}:
    raise ValueError("not an encoded value")
  tag, v = t["~"], t["v"]
  if tag == "int" and type(v) is str:
    return int(v, 16)
  if tag == "bytes" and type(v) is str:
    return bytes.fromhex(v)
  if tag == "complex" and type(v) is list and len(v) == 2 and all(type(a) is float for a in v):
    return complex(*v)
  if type(v) is not list:
    raise ValueError(f"bad {tag!r}")
  if tag == "dict":
    return dict((decode(k, depth + 1), decode(w, depth + 1)) for k, w in v)
  kind = {"tuple": tuple, "set": set, "frozenset": frozenset}.get(tag)
  if kind is None:
    raise ValueError(f"unknown tag {tag!r}")
  return kind(decode(w, depth + 1) for w in v)


def _not_json(x):
  raise NotPlain(f"{type(x).__name__} is not plain data")


_dumps = _json.make_encoder(None, _not_json, _json.encode_basestring_ascii, None, ":", ",",
                            False, False, True)


class _Scanning:
  strict, object_hook, object_pairs_hook = True, None, None
  parse_float, parse_int, parse_constant = float, int, float


_scan = _json.make_scanner(_Scanning())


def dumps(tree) -> bytes:
  """JSON text of a tree of JSON's types (NaN and Infinity as Python's json writes them)."""
  return "".join(_dumps(tree, 0)).encode()


def loads(data: bytes):
  """The tree of `dumps` text; ValueError if it is anything else."""
  try:
    text = data.decode()
    tree, end = _scan(text, 0)
  except StopIteration:
    raise ValueError("not JSON") from None
  if end != len(text):
    raise ValueError("trailing data")
  return tree


def send(fd: int, message) -> None:
  data = dumps(message)
  if len(data) > MAX_FRAME:
    data = dumps(["raise", "ValueError", "the value is too large to compare"])
  data = memoryview(len(data).to_bytes(4, "big") + data)
  while data:
    data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes | None:
  chunks = []
  while n:
    chunk = os.read(fd, min(n, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    n -= len(chunk)
  return b"".join(chunks)


def receive(fd: int):
  """The next message, or None at end of stream (or a frame over MAX_FRAME)."""
  head = _read_exactly(fd, 4)
  if head is None:
    return None
  n = int.from_bytes(head, "big")
  body = _read_exactly(fd, n) if n <= MAX_FRAME else None
  return None if body is None else loads(body)


def _kind(v) -> str:
  if type(v) is type(sys):
    return f"module:{v.__name__}"
  return "callable" if callable(v) else "value"


def _serve(ns: dict, requests: int, replies: int) -> None:
  while (msg := receive(requests)) is not None:
    try:
      if msg[0] == "value":
        result = ns[msg[1]]
      else:
        _, name, args, kwargs = msg
        result = ns[name](*decode(args), **decode(kwargs))
      reply = ["ret", encode(result)]
    except SystemExit as e:
      send(replies, ["exited", repr(e.code)])
      raise SystemExit(3) from None
    except BaseException as e:  # noqa: BLE001 - the program's own error, reported
      reply = ["raise", type(e).__name__, str(e)[:1000]]
    sys.stdout.flush()
    send(replies, reply)


def main() -> None:
  import resource
  for name, value in loads(sys.argv[1].encode()).items():
    resource.setrlimit(getattr(resource, name), (value, value))
  requests, replies = int(sys.argv[2]), int(sys.argv[3])
  job = receive(requests)
  sys.argv = ["program.py"]
  ns = {"__name__": "__main__", "__builtins__": __builtins__}
  try:
    exec(compile(job["source"], "program.py", "exec"), ns)  # noqa: S102 - contained
  except SystemExit as e:
    print(f"sandbox: the program exited ({e.code!r}) before finishing", file=sys.stderr)
    send(replies, ["exited", repr(e.code)])
    raise SystemExit(3) from None
  except BaseException as e:  # noqa: BLE001
    import traceback
    traceback.print_exc()
    send(replies, ["error", f"{type(e).__name__}: {str(e)[:1000]}"])
    raise SystemExit(1) from None
  sys.stdout.flush()
  send(replies, ["ready", {k: _kind(v) for k, v in ns.items()
                           if isinstance(k, str) and not k.startswith("__")}])
  if job.get("serve"):
    _serve(ns, requests, replies)


if __name__ == "__main__":
  main()
