"""Exception fidelity (issue #9, item 10): a task's exception reaches the
caller as its own type, even where ``ProcessPoolExecutor`` cannot send it.

Real pools, real workers. Classes defined here travel by reference (workers
import this module); the ``__main__`` script at the end sends them by value.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import threading
from concurrent.futures.process import _RemoteTraceback

import ironpool
import pytest
from conftest import run_python, worker_pids

# --- exceptions and tasks (run in workers) -------------------------------------


class CodeError(ValueError):
    """Two required arguments; ``args`` holds one string, so ``cls(*args)`` fails."""

    inits = 0

    def __init__(self, code, text):
        super().__init__(f"{code}: {text}")
        type(self).inits += 1
        self.code = code
        self.text = text


class Baggage(Exception):
    """Carries things no pickle can send, next to plain attributes."""

    def __init__(self, what):
        super().__init__(f"carrying {what}")
        self.lock = threading.Lock()
        self.gen = (i for i in range(3))
        self.file = open(os.devnull, "w")  # cloudpickle would send a file open for reading
        self.weight = 12


class NoStr(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)

    def __str__(self):
        raise RuntimeError("no str for you")

    def __repr__(self):
        raise RuntimeError("no repr either")


def raise_code(code, text="bad"):
    raise CodeError(code, text)


def raise_baggage():
    raise Baggage("a lock")


def raise_with_notes_and_cause():
    try:
        {}["missing"]
    except KeyError as key:
        try:
            raise CodeError(1, "inner") from key
        except CodeError as inner:
            err = CodeError(2, "outer")
            err.add_note("first note")
            err.add_note("second note")
            raise err from inner


def raise_with_context():
    try:
        raise CodeError(3, "while handling")
    except CodeError:
        raise KeyError("during")  # noqa: B904 (the implicit context is the point)


def raise_cycle():
    a = CodeError(1, "a")
    b = CodeError(2, "b")
    a.__cause__ = b
    b.__cause__ = a
    raise a


def raise_deep(n):
    err = None
    for i in range(n):
        nxt = CodeError(i, "link")
        nxt.__cause__ = err
        err = nxt
    raise err


def raise_group():
    inner = ExceptionGroup("inner", [TypeError("typed"), CodeError(5, "nested")])
    raise ExceptionGroup("many", [CodeError(4, "member"), KeyError("k"), Baggage("x"), inner])


def raise_no_str():
    raise NoStr(1, [2, 3])


def raise_unpicklable_arg():
    raise ValueError("plain", threading.Lock())


def fail_at(x):
    if x == 5:
        raise CodeError(x, "item five")
    return x * 2


def flaky(counter_path, fails):
    """Raises CodeError for the first ``fails`` calls (counted in a file), then returns."""
    with open(counter_path, "a+") as f:
        f.seek(0)
        calls = len(f.read())
        f.write("x")
    if calls < fails:
        raise CodeError(calls, "not yet")
    return calls


def raise_from_module(name):
    importlib.import_module(name).raise_it()


def raise_local_unsendable():
    class LocalError(Exception):
        guard = threading.Lock()  # in the class itself: not even cloudpickle sends it

        def __init__(self, a, b):
            super().__init__(f"{a}+{b}")

    raise LocalError("left", "right")


def identity(x):
    return x


# --- tests ----------------------------------------------------------------------


@pytest.fixture
def pool1():
    p = ironpool.Pool(1)
    yield p
    p.terminate()


def test_custom_init_is_caught_by_its_type_and_its_base(pool):
    CodeError.inits = 0
    fut = pool.submit(raise_code, 7)
    with pytest.raises(CodeError) as info:
        fut.result(timeout=30)
    err = info.value
    assert str(err) == "7: bad" and err.args == ("7: bad",)
    assert err.code == 7 and err.text == "bad"
    assert CodeError.inits == 0  # rebuilt without running __init__ in the caller
    assert isinstance(err.__cause__, _RemoteTraceback)
    assert "raise_code" in err.__cause__.tb and "CodeError: 7: bad" in err.__cause__.tb
    try:
        pool.submit(raise_code, 8).result(timeout=30)
    except ValueError as caught:  # the stdlib base matches too
        assert type(caught) is CodeError and caught.code == 8
    else:
        pytest.fail("no exception")


def test_unpicklable_attributes_are_dropped_and_the_type_kept(pool):
    err = pool.submit(raise_baggage).exception(timeout=30)
    assert type(err) is Baggage, repr(err)
    assert err.args == ("carrying a lock",)
    assert err.weight == 12
    for name in ("lock", "gen", "file"):
        assert not hasattr(err, name)
    note = "\n".join(err.__notes__)
    assert "dropped" in note and "lock" in note and "gen" in note and "file" in note, note
    assert isinstance(err.__cause__, _RemoteTraceback) and "raise_baggage" in err.__cause__.tb


def test_unpicklable_arg_is_replaced_by_its_repr(pool):
    err = pool.submit(raise_unpicklable_arg).exception(timeout=30)
    assert type(err) is ValueError
    assert err.args[0] == "plain"
    assert isinstance(err.args[1], str) and "lock" in err.args[1]
    assert any("args[1]" in n and "repr" in n for n in err.__notes__), err.__notes__


def test_notes_and_cause_chain_are_kept(pool):
    fut = pool.submit(raise_with_notes_and_cause)
    with pytest.raises(CodeError) as info:
        fut.result(timeout=30)
    err = info.value
    assert err.code == 2
    assert err.__notes__[:2] == ["first note", "second note"]
    inner = err.__cause__
    assert type(inner) is CodeError and inner.code == 1
    key = inner.__cause__
    assert type(key) is KeyError and key.args == ("missing",)
    # The remote traceback hangs at the end of the cause chain.
    assert isinstance(key.__cause__, _RemoteTraceback)
    assert "raise_with_notes_and_cause" in key.__cause__.tb
    # The stored exception keeps the implicit context too.
    stored = fut.exception()
    assert stored.__context__ is stored.__cause__
    assert stored.__suppress_context__


def test_implicit_context_is_kept(pool):
    err = pool.submit(raise_with_context).exception(timeout=30)
    assert type(err) is KeyError
    ctx = err.__context__
    assert type(ctx) is CodeError and ctx.code == 3
    assert isinstance(err.__cause__, _RemoteTraceback)


def test_cycles_and_deep_chains_are_bounded(pool):
    err = pool.submit(raise_cycle).exception(timeout=30)
    assert type(err) is CodeError and err.code == 1
    assert err.__cause__.code == 2 and err.__cause__.__cause__ is err
    assert any("remote traceback" in n and "raise_cycle" in n for n in err.__notes__)

    err = pool.submit(raise_deep, 500).exception(timeout=30)
    assert type(err) is CodeError and err.code == 499
    depth, link = 0, err
    while isinstance(link, CodeError):
        depth += 1
        link = link.__cause__
    assert 10 < depth < 100, depth
    assert isinstance(link, _RemoteTraceback)
    assert any("cut" in n for n in err.__notes__), err.__notes__


def leaves(group):
    for e in group.exceptions:
        yield from leaves(e) if isinstance(e, BaseExceptionGroup) else [e]


def test_exception_group_keeps_every_member_and_except_star_works(pool):
    fut = pool.submit(raise_group)
    err = fut.exception(timeout=30)
    assert type(err) is ExceptionGroup and err.message == "many"
    assert [type(e) for e in err.exceptions] == [CodeError, KeyError, Baggage, ExceptionGroup]
    assert err.exceptions[0].code == 4
    assert err.exceptions[2].weight == 12 and not hasattr(err.exceptions[2], "lock")
    assert [type(e) for e in err.exceptions[3].exceptions] == [TypeError, CodeError]
    assert isinstance(err.__cause__, _RemoteTraceback)
    seen = {}
    try:
        fut.result(timeout=30)
    except* CodeError as group:
        seen["code"] = sorted(e.code for e in leaves(group))
    except* TypeError:
        seen["type"] = True
    except* (KeyError, Baggage) as group:
        seen["rest"] = len(group.exceptions)
    assert seen == {"code": [4, 5], "type": True, "rest": 2}, seen


def test_str_and_repr_that_raise_do_not_cost_the_worker_or_the_outcome(pool1):
    before = worker_pids(pool1) or {pool1.submit(os.getpid).result(timeout=30)}
    err = pool1.submit(raise_no_str).exception(timeout=30)
    assert type(err) is NoStr
    assert err.args == (1, [2, 3])
    notes = "\n".join(err.__notes__)
    assert "str() of this NoStr failed" in notes and "no str for you" in notes, notes
    assert "repr() of this NoStr failed" in notes, notes
    assert isinstance(err.__cause__, _RemoteTraceback)
    assert pool1.submit(identity, 11).result(timeout=30) == 11
    assert pool1.submit(os.getpid).result(timeout=30) in before  # the same worker


def test_map_raises_the_failing_items_exception(pool):
    with pytest.raises(CodeError) as info:
        list(pool.map(fail_at, range(20)))
    assert info.value.code == 5 and info.value.text == "item five"
    assert "fail_at" in info.value.__cause__.tb
    with pytest.raises(ValueError):
        list(pool.map(fail_at, range(20), chunksize=4))


def test_retry_on_matches_the_rebuilt_type(tmp_path):
    with ironpool.Pool(2, retries=3, retry_on=(ValueError,)) as p:
        counter = str(tmp_path / "calls")
        assert p.submit(flaky, counter, 2).result(timeout=30) == 2
        counter = str(tmp_path / "calls-always")
        with pytest.raises(CodeError) as info:
            p.submit(flaky, counter, 100).result(timeout=30)
    assert info.value.code == 3  # the fourth and last attempt
    assert any("earlier attempts" in n for n in info.value.__notes__)
    assert len(open(counter).read()) == 4


def test_class_the_caller_cannot_import_becomes_remote_error(tmp_path):
    name = f"fidelity_vanishing_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        class VanishingError(LookupError):
            def __init__(self, a, b):
                super().__init__(f"{a} and {b}")
                self.a = a

        def raise_it():
            raise VanishingError("here", "gone")
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        p = ironpool.Pool(1)  # its workers get this sys.path
    finally:
        sys.path.remove(str(tmp_path))
    try:
        assert name not in sys.modules
        err = p.submit(raise_from_module, name).exception(timeout=30)
        assert type(err) is ironpool.RemoteError, repr(err)
        assert f"{name}.VanishingError" in str(err) and "here and gone" in str(err)
        assert err.type_name == f"{name}.VanishingError"
        assert "raise_it" in err.traceback
        assert isinstance(err.__cause__, _RemoteTraceback) and "VanishingError" in err.__cause__.tb
        assert any("could not be rebuilt" in n and name in n for n in err.__notes__), err.__notes__
        assert p.submit(identity, 1).result(timeout=30) == 1
    finally:
        p.terminate()


def test_class_that_pickles_neither_way_becomes_remote_error(pool):
    err = pool.submit(raise_local_unsendable).exception(timeout=30)
    assert type(err) is ironpool.RemoteError, repr(err)
    assert f"{__name__}.raise_local_unsendable.<locals>.LocalError" in str(err), str(err)
    assert "left+right" in str(err)
    assert isinstance(err.__cause__, _RemoteTraceback)


MAIN_SCRIPT = """
import ironpool, threading

class TwoArgError(Exception):
    def __init__(self, code, text):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.lock = threading.Lock()

def boom(code):
    raise TwoArgError(code, "from main")

def group():
    raise ExceptionGroup("g", [TwoArgError(1, "a"), ValueError("v")])

if __name__ == "__main__":
    with ironpool.Pool(2) as pool:
        try:
            pool.submit(boom, 9).result(timeout=30)
        except TwoArgError as e:
            assert e.code == 9 and str(e) == "9: from main" and not hasattr(e, "lock"), vars(e)
            print("CAUGHT", type(e).__qualname__, e.code)
        try:
            list(pool.map(boom, [1, 2]))
        except TwoArgError as e:
            print("MAP", e.code)
        try:
            pool.submit(group).result(timeout=30)
        except* TwoArgError as g:
            print("STAR", [e.code for e in g.exceptions])
        except* ValueError:
            print("STAR-VALUE")
"""


def test_main_script_classes_come_back_as_themselves(tmp_path):
    script = tmp_path / "fidelity_main.py"
    script.write_text(MAIN_SCRIPT)
    proc = run_python(str(script), timeout=90, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split("\n")
    assert "CAUGHT TwoArgError 9" in lines, proc.stdout
    assert "MAP 1" in lines, proc.stdout
    assert "STAR [1]" in lines and "STAR-VALUE" in lines, proc.stdout
