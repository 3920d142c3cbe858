"""A task's exception, sent back to the caller as itself.

``pack_exception`` (in the worker) takes the exception apart into plain data
that always unpickles: its class (by reference for importable modules, by
value for ``__main__``, local and lambda-land classes, as ``_serialize.dumps``
decides), each arg, each ``__dict__`` entry (``__notes__`` included) pickled
on its own, its ``__cause__``/``__context__`` links and, for an exception
group, its members, each taken apart the same way. ``unpack_exception`` (in
the caller) rebuilds it without running any Python ``__init__``: the object
comes from the nearest builtin base's ``__new__`` with the args, that base's
C initialiser fills its C fields (``errno``, ``StopIteration.value``...),
then the attributes are set. What could not travel is said in a note:

- an attribute that does not pickle (a lock, a generator, an open file) is
  dropped;
- an arg that does not pickle is replaced by its repr (bounded);
- a ``str()``/``repr()`` that raised in the worker is reported;
- chains longer than ``MAX_DEPTH`` links (or trees of more than
  ``MAX_NODES`` exceptions) are cut; cycles are rebuilt as cycles.

Only a class that cannot be sent at all (its module is not importable in the
caller, or it pickles neither by reference nor by value) falls back to
``RemoteError``, whose message names the class's module and qualname. An
exception group whose own class cannot be sent becomes a plain
``(Base)ExceptionGroup`` of the rebuilt members, so ``except*`` still works.

The remote traceback text comes back as ``ProcessPoolExecutor`` sends it: the
``__cause__`` of the exception is a ``_RemoteTraceback`` holding it. When the
exception has its own ``__cause__``, that cause is kept and the
``_RemoteTraceback`` becomes the ``__cause__`` of the last exception of the
cause chain (so it prints first, as the origin); if the chain is a cycle, the
text is a note of the exception instead.

The worker side imports nothing costly at module level: the template process
imports this module.
"""

from __future__ import annotations

from ._serialize import dumps, loads

TYPE_CHECKING = False  # workers never import typing (see _worker)
if TYPE_CHECKING:
    from typing import Any

#: Links followed from the raised exception (causes, contexts, group members).
MAX_DEPTH = 32
#: Exceptions in one packed tree.
MAX_NODES = 256
#: Longest repr kept for an arg that does not pickle, and longest message.
MAX_REPR = 200
MAX_TEXT = 4000

_FORMAT = "ironpool.exception/1"
_CAUSE, _CONTEXT = 0, 1

#: Class -> its pickled bytes (a worker sends the same few classes again and again).
_class_blobs: dict = {}


# --- worker side ---------------------------------------------------------------


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None) or "?"
    qualname = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "?")
    return f"{module}.{qualname}"


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:
        text = "<str() failed>"
    return _bounded(f"{type(exc).__name__}: {text}", MAX_REPR)


def _safe_repr(value: object) -> str:
    try:
        text = repr(value)
    except BaseException as exc:
        text = f"<{_type_name(type(value))} object; repr() raised {_describe(exc)}>"
    return _bounded(text, MAX_REPR)


def _dump(obj: object) -> bytes:
    """One object pickled alone, in band (by value where ``dumps`` sends code by value)."""
    parts = dumps(obj, 1 << 62)
    return parts[0]


def _dump_class(cls: type) -> bytes:
    blob = _class_blobs.get(cls)
    if blob is None:
        blob = _dump(cls)
        if len(_class_blobs) >= 128:
            _class_blobs.clear()
        _class_blobs[cls] = blob
    return blob


#: C-level fields set from keywords, not args (so not rebuilt from args).
_KEYWORD_FIELDS = (
    (ImportError, ("name", "path", "name_from")),
    (AttributeError, ("name", "obj")),
    (NameError, ("name",)),
    (OSError, ("filename", "filename2")),
)


class _Packer:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.memo: dict[int, int] = {}
        self.keep: list = []  # keeps packed exceptions alive, so ids stay unique
        self.cut = False

    def link(self, exc: object, depth: int) -> int | None:
        if not isinstance(exc, BaseException):
            return None
        done = self.memo.get(id(exc))
        if done is not None:
            return done
        if depth > MAX_DEPTH or len(self.nodes) >= MAX_NODES:
            self.cut = True
            return None
        return self.pack(exc, depth)

    def pack(self, exc: BaseException, depth: int) -> int:
        index = len(self.nodes)
        self.memo[id(exc)] = index
        self.keep.append(exc)
        cls = type(exc)
        notes: list[str] = []
        node: dict = {"name": _type_name(cls), "cls": None, "why": None, "notes": notes}
        self.nodes.append(node)
        try:
            node["cls"] = _dump_class(cls)
        except BaseException as err:
            node["why"] = _describe(err)

        try:
            node["text"] = _bounded(str(exc), MAX_TEXT)
        except BaseException as err:
            node["text"] = None
            notes.append(f"ironpool: str() of this {cls.__qualname__} failed in the worker: {_describe(err)}")
        if cls.__repr__ is not BaseException.__repr__:
            try:
                repr(exc)
            except BaseException as err:
                notes.append(f"ironpool: repr() of this {cls.__qualname__} failed in the worker: {_describe(err)}")

        if isinstance(exc, BaseExceptionGroup):
            node["message"] = exc.message
            node["members"] = [self.link(m, depth + 1) for m in exc.exceptions]
        else:
            args: list[tuple[bool, Any]] = []
            for i, arg in enumerate(exc.args):
                try:
                    args.append((True, _dump(arg)))
                except BaseException as err:
                    args.append((False, _safe_repr(arg)))
                    notes.append(
                        f"ironpool: args[{i}] ({_type_name(type(arg))}) could not be pickled ({_describe(err)}) "
                        "and was replaced by its repr"
                    )
            node["args"] = args

        attrs, dropped = [], []
        state = getattr(exc, "__dict__", None) or {}
        for name, value in list(state.items()):
            try:
                attrs.append((name, _dump(value)))
            except BaseException as err:
                dropped.append(f"{name} ({_type_name(type(value))}: {_describe(err)})")
        node["attrs"] = attrs
        fields = []
        for base, names in _KEYWORD_FIELDS:
            if isinstance(exc, base):
                for name in names:
                    value = getattr(exc, name, None)
                    if value is None:
                        continue
                    try:
                        fields.append((name, _dump(value)))
                    except BaseException as err:
                        dropped.append(f"{name} ({_type_name(type(value))}: {_describe(err)})")
        node["fields"] = fields
        if dropped:
            notes.append("ironpool: attributes dropped because they could not be pickled: " + "; ".join(dropped))

        node["suppress"] = bool(exc.__suppress_context__)
        node["cause"] = self.link(exc.__cause__, depth + 1)
        node["context"] = self.link(exc.__context__, depth + 1)
        return index


def _format(exc: BaseException) -> str:
    try:
        import traceback

        return "".join(traceback.format_exception(exc))
    except BaseException as err:
        return f"{_type_name(type(exc))} (its traceback could not be formatted: {_describe(err)})\n"


def pack_exception(exc: BaseException) -> tuple:
    """A task's exception as plain data that unpickles anywhere (see the module doc)."""
    tb = _format(exc)
    exc.__traceback__ = None
    try:
        packer = _Packer()
        packer.pack(exc, 0)
        nodes = packer.nodes
        if packer.cut:
            nodes[0]["notes"].append(
                f"ironpool: the exception chain was cut after {MAX_DEPTH} links or {MAX_NODES} exceptions"
            )
    except BaseException as err:  # never lose the outcome
        name = _type_name(type(exc))
        nodes = [{
            "name": name, "cls": None, "why": f"it could not be taken apart: {_describe(err)}",
            "notes": [], "text": None, "args": [], "attrs": [], "fields": [],
            "suppress": False, "cause": None, "context": None,
        }]
    return (_FORMAT, nodes, tb)


# --- caller side ---------------------------------------------------------------


def _add_note(exc: BaseException, note: str) -> None:
    try:
        exc.add_note(note)
    except Exception:
        try:
            exc.__notes__ = [*list(getattr(exc, "__notes__", ())), note]
        except Exception:
            pass


def _builtin_base(cls: type) -> type:
    for k in cls.__mro__:
        if k.__module__ == "builtins":
            return k
    return BaseException


def _new(cls: Any, args: tuple) -> Any:
    """An instance of ``cls`` with ``args``, no Python ``__new__``/``__init__`` run."""
    base: Any = _builtin_base(cls)
    try:
        obj = base.__new__(cls, *args)
    except TypeError:  # an extension type with its own layout
        try:
            obj = cls.__new__(cls, *args)
        except TypeError:
            obj = cls.__new__(cls)
    try:
        base.__init__(obj, *args)  # C fields: OSError.errno, StopIteration.value, ...
    except Exception:
        pass
    obj.args = args
    return obj


class _Builder:
    def __init__(self, nodes: list, tb: str) -> None:
        self.nodes = nodes
        self.tb = tb
        self.built: list = [None] * len(nodes)

    def load_class(self, node: dict) -> tuple[type | None, str | None]:
        if node.get("cls") is None:
            return None, node.get("why") or "it could not be pickled in the worker"
        try:
            cls = loads([node["cls"]])
        except BaseException as err:
            return None, _describe(err)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None, f"it unpickled as {_safe_repr(cls)}"
        return cls, None

    def get(self, index: int | None) -> BaseException | None:
        if index is None:
            return None
        obj: BaseException | None = self.built[index]
        if obj is None:
            obj = self.built[index] = self.make(self.nodes[index])
        return obj

    def make(self, node: dict) -> BaseException:
        notes = list(node.get("notes") or ())
        cls, why = self.load_class(node)
        obj: Any = None
        if "members" in node:
            members = [m for m in (self.get(i) for i in node["members"]) if m is not None]
            message = node.get("message", "")
            if cls is not None:
                try:
                    obj = BaseExceptionGroup.__new__(cls, message, members)
                except BaseException as err:
                    why = _describe(err)
            if obj is None:
                obj = BaseExceptionGroup(message, members)
                notes.insert(0, f"ironpool: this was a {node['name']}, whose class could not be rebuilt here ({why})")
        else:
            args = []
            for i, (ok, value) in enumerate(node.get("args", ())):
                if ok:
                    try:
                        value = loads([value])
                    except BaseException as err:
                        notes.append(
                            f"ironpool: args[{i}] could not be unpickled here ({_describe(err)}); None instead"
                        )
                        value = None
                args.append(value)
            if cls is not None:
                try:
                    obj = _new(cls, tuple(args))
                except BaseException as err:
                    why = _describe(err)
            if obj is None:
                from .errors import RemoteError

                text = node.get("text")
                obj = RemoteError(node["name"], "<str() failed>" if text is None else text, self.tb)
                notes.insert(0, f"ironpool: the class {node['name']} could not be rebuilt here ({why})")
                node = {**node, "attrs": (), "fields": ()}

        dropped = []
        state = getattr(obj, "__dict__", None)
        for name, blob in node.get("attrs", ()):
            try:
                state[name] = loads([blob])  # type: ignore[index]
            except BaseException as err:
                dropped.append(f"{name} ({_describe(err)})")
        for name, blob in node.get("fields", ()):
            try:
                setattr(obj, name, loads([blob]))
            except BaseException as err:
                dropped.append(f"{name} ({_describe(err)})")
        if dropped:
            notes.append("ironpool: attributes dropped because they could not be unpickled here: " + "; ".join(dropped))
        for note in notes:
            _add_note(obj, note)
        return obj

    def build(self) -> BaseException:
        root = self.get(0)
        for index, node in enumerate(self.nodes):  # links, once every exception exists
            obj: Any = self.get(index)
            obj.__cause__ = self.get(node.get("cause"))
            obj.__context__ = self.get(node.get("context"))
            obj.__suppress_context__ = bool(node.get("suppress"))
        return root  # type: ignore[return-value]


def copy_exception(exc: BaseException) -> BaseException | None:
    """A shallow copy of ``exc`` made as ``unpack_exception`` builds one (no
    Python ``__init__`` runs, so classes whose ``__init__`` does not take
    their ``args`` copy too), or None if it cannot be made."""
    cls: Any = type(exc)
    try:
        if isinstance(exc, BaseExceptionGroup):
            new: Any = BaseExceptionGroup.__new__(cls, exc.message, exc.exceptions)
        else:
            new = _new(cls, exc.args)
        state = getattr(exc, "__dict__", None)
        if state:
            new.__dict__.update(state)
            if isinstance(state.get("__notes__"), list):
                new.__notes__ = list(state["__notes__"])  # a note added to the copy stays there
        for base, names in _KEYWORD_FIELDS:
            if isinstance(exc, base):
                for name in names:
                    if getattr(exc, name, None) is not None:
                        setattr(new, name, getattr(exc, name))
        new.__cause__ = exc.__cause__
        new.__context__ = exc.__context__
        new.__suppress_context__ = exc.__suppress_context__
    except Exception:
        return None
    return new if type(new) is cls else None


def _attach_traceback(exc: BaseException, tb: str) -> None:
    from concurrent.futures.process import _RemoteTraceback

    remote: Any = _RemoteTraceback(f'\n"""\n{tb}"""')  # type: ignore[arg-type]  # the stdlib passes a str
    remote.ironpool_tb = tb  # for repack_exception
    last, seen = exc, {id(exc)}
    while last.__cause__ is not None:
        last = last.__cause__
        if id(last) in seen:  # a cycle: no end to hang it on
            _add_note(exc, "ironpool: remote traceback:\n" + tb)
            return
        seen.add(id(last))
    suppress = last.__suppress_context__
    last.__cause__ = remote
    if last is not exc:
        last.__suppress_context__ = suppress


def repack_exception(exc: BaseException) -> tuple | None:
    """Packs again an exception ``unpack_exception`` rebuilt, to send it on
    (a cluster node passing a task's exception to its caller) with the
    worker's traceback, not the frames that re-raised it; None for one that
    did not come from a worker (an ironpool error: it pickles as itself)."""
    last, before = exc, None
    seen = {id(exc)}
    while last.__cause__ is not None and id(last.__cause__) not in seen:
        before, last = last, last.__cause__
        seen.add(id(last))
    tb = getattr(last, "ironpool_tb", None)
    if before is None or not isinstance(tb, str):
        return None
    before.__cause__ = None
    packed = pack_exception(exc)
    return (packed[0], packed[1], tb)


def unpack_exception(packed: tuple) -> BaseException:
    """Rebuilds a task's exception from ``pack_exception``'s data, with the
    remote traceback as its cause, as ``ProcessPoolExecutor`` does."""
    tb = ""
    try:
        _, nodes, tb = packed
        exc = _Builder(nodes, tb).build()
    except BaseException as err:  # never lose the outcome
        from .errors import RemoteError

        name = "?"
        try:
            name = packed[1][0]["name"]
        except Exception:
            pass
        exc = RemoteError(name, f"<the exception could not be rebuilt: {_describe(err)}>", tb)
    _attach_traceback(exc, tb)
    return exc
