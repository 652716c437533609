"""Which maintained library can type-check spo's configuration without losing a behaviour?

Runs each candidate on a table of what ``spo.config`` does today and prints (``--out``: also
writes) a JSON table of kept / lost per behaviour and candidate:

* ``pydantic``: ``pydantic.TypeAdapter`` over plain annotations and stdlib dataclasses, three
  ways: its lax mode as it comes, its strict mode as it comes, and the profile that
  ``spo.config.types`` builds (strict scalars, pydantic's lax tuple for lists, and two YAML 1.1
  ``BeforeValidator`` hooks that only the loader's lenient view carries);
* ``omegaconf``: structured configs (``OmegaConf.structured`` + ``OmegaConf.merge``);
* ``draccus``: ``draccus.decode`` (the decoder under its argparse / YAML front end).

A candidate that is not installed is reported as such; install OmegaConf and draccus in a
throwaway environment, never in the project's::

    python3 -m venv --system-site-packages /tmp/cfgsurvey
    /tmp/cfgsurvey/bin/pip install omegaconf draccus   # pydantic comes from the project's deps
    /tmp/cfgsurvey/bin/python tools/config_library_survey.py --out /tmp/config-survey.json

The schema surveyed is a small copy of every annotation kind of ``spo/config/schema.py`` (so the
survey does not depend on the schema of the day). The ``real schema`` row also tries the real
``SPOConfig``, whose default objective section needs torch (the methods' registry): it is skipped
under an interpreter without torch; to run it, put the throwaway packages on the project's
interpreter (``typing_inspect`` copied in, as the system's would be hidden)::

    /tmp/cfgsurvey/bin/pip install --ignore-installed typing_inspect mypy_extensions
    PYTHONPATH=/tmp/cfgsurvey/lib/python3.11/site-packages .venv/bin/python tools/config_library_survey.py
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

# --------------------------------------------------------------------------- the mini schema


@dataclass
class Pools:
    k: int = 4
    kappa: int | None = None
    threshold: float = 0.3
    resampler: Literal["random", "win", "lose"] = "random"


@dataclass
class Optim:
    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None


@dataclass
class Lora:
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k"])
    alpha: float | None = None


@dataclass
class Train:
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    carry_accumulation: bool = False
    timesteps: list[int] = field(default_factory=lambda: [0, 251])


@dataclass
class Method:
    name: str = "spo"


@dataclass
class SPOMethod(Method):
    """A section whose class is picked at run time (spo: by ``objective.name``)."""

    beta: float = 10.0


@dataclass
class Root:
    seed: int = 42
    revision: str | None = None
    pools: Pools = field(default_factory=Pools)
    optim: Optim = field(default_factory=Optim)
    lora: Lora = field(default_factory=Lora)
    train: Train = field(default_factory=Train)
    objective: Method = field(default_factory=SPOMethod)


OK, ERR = "accept", "reject"

# (behaviour, annotation, value, mode, today's outcome, today's canonical value); mode "lenient" is
# the loader (YAML files, key=value overrides), "strict" is validate() on a config built in code.
CASES: list[tuple[str, Any, Any, str, str, Any]] = [
    ("X or null: null", float | None, None, "lenient", OK, None),
    ("X or null: a value", float | None, 0.1, "lenient", OK, 0.1),
    ("X or null: a wrong value", float | None, "tiny", "lenient", ERR, None),
    ("Literal: a choice", Literal["random", "win", "lose"], "win", "lenient", OK, "win"),
    ("Literal: a typo", Literal["random", "win", "lose"], "winner", "lenient", ERR, None),
    ("Literal or null: a choice", Literal["a", "b"] | None, "a", "lenient", OK, "a"),
    ("list[str]: a list", list[str], ["to_q", "to_k"], "lenient", OK, ["to_q", "to_k"]),
    ("list[str]: a number item", list[str], ["to_q", 3], "lenient", ERR, None),
    ("list[str]: a bare string", list[str], "to_q", "lenient", ERR, None),
    ("list[int]: a list", list[int], [0, 251], "lenient", OK, [0, 251]),
    ("tuple[float, float]: a list", tuple[float, float], [0.9, 0.99], "lenient", OK, (0.9, 0.99)),
    ("tuple[float, float]: ints", tuple[float, float], [1, 0], "lenient", OK, (1.0, 0.0)),
    ("tuple[float, float]: wrong length", tuple[float, float], [0.9], "lenient", ERR, None),
    ("tuple[float, float]: a bad item", tuple[float, float], [0.9, "x"], "lenient", ERR, None),
    ("int accepted for float (converted)", float, 7, "lenient", OK, 7.0),
    ("YAML 1.1 string float '6e-5' (loader)", float, "6e-5", "lenient", OK, 6e-5),
    ("string float '6e-5' in code (strict)", float, "6e-5", "strict", ERR, None),
    ("garbage string for float", float, "fast", "lenient", ERR, None),
    ("'inf' string for float", float, "inf", "lenient", ERR, None),
    ("bool not an int", int, True, "lenient", ERR, None),
    ("bool not a float", float, True, "lenient", ERR, None),
    ("number not a bool", bool, 1, "lenient", ERR, None),
    ("string not a bool", bool, "true", "lenient", ERR, None),
    ("string not an int", int, "3", "lenient", ERR, None),
    ("fraction not an int", int, 2.5, "lenient", ERR, None),
    ("whole float not an int", int, 3.0, "lenient", ERR, None),
    ("number not a str", str, 83, "lenient", ERR, None),
    ("null not a str", str, None, "lenient", ERR, None),
    ("null not an int", int, None, "lenient", ERR, None),
    ("YAML 1.1 'no' (false) for Literal 'no' (loader)", Literal["no", "fp16", "bf16"], False, "lenient", OK, "no"),
    ("false for Literal 'no' in code (strict)", Literal["no", "fp16", "bf16"], False, "strict", ERR, None),
    ("bool stays a bool", bool, False, "lenient", OK, False),
]

NESTED = {"seed": 7, "pools": {"k": 3, "resampler": "win"}, "optim": {"betas": [0.8, 0.95]},
          "train": {"mixed_precision": "fp16"}}
BAD_NESTED = {"pools": {"k": "four", "threshold": "high"}, "optim": {"betas": [0.9, "x"]}}


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b and (not isinstance(a, (list, tuple)) or all(
        _same(x, y) for x, y in zip(a, b)))


# --------------------------------------------------------------------------- candidates


class Candidate:
    name = ""
    package = ""

    def check(self, tp: Any, value: Any, strict: bool) -> Any:  # raises on rejection
        raise NotImplementedError

    def load(self, cls: type, data: dict) -> Any:  # raises on rejection
        raise NotImplementedError

    def errors(self, exc: Exception) -> list[str]:
        return [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]

    def kinds(self, exc: Exception) -> list[str]:
        """Machine-readable kinds of the errors, where the library gives them."""
        return []


class PydanticLax(Candidate):
    name, package = "pydantic (lax, as it comes)", "pydantic"

    def __init__(self) -> None:
        import pydantic

        self.pd = pydantic

    def adapter(self, tp: Any, strict: bool) -> Any:
        return self.pd.TypeAdapter(tp)

    def check(self, tp: Any, value: Any, strict: bool) -> Any:
        return self.adapter(tp, strict).validate_python(value)

    def load(self, cls: type, data: dict) -> Any:
        return self.pd.TypeAdapter(cls).validate_python(data)

    def errors(self, exc: Exception) -> list[str]:
        if isinstance(exc, self.pd.ValidationError):
            return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return super().errors(exc)

    def kinds(self, exc: Exception) -> list[str]:
        return [e["type"] for e in exc.errors()] if isinstance(exc, self.pd.ValidationError) else []


class PydanticStrict(PydanticLax):
    name = "pydantic (strict, as it comes)"

    def check(self, tp: Any, value: Any, strict: bool) -> Any:
        return self.pd.TypeAdapter(tp).validate_python(value, strict=True)

    def load(self, cls: type, data: dict) -> Any:
        return self.pd.TypeAdapter(cls).validate_python(data, strict=True)


class PydanticProfile(PydanticLax):
    """What ``spo.config.types`` builds from an annotation (a copy, so the survey stands alone)."""

    name = "pydantic (spo profile)"

    def view(self, tp: Any, lenient: bool) -> Any:
        from typing import Annotated, Union, get_args, get_origin

        pd = self.pd
        origin, args = get_origin(tp), get_args(tp)
        if tp in (int, bool, str):
            return Annotated[tp, pd.Strict()]
        if tp is float:
            hook = [pd.BeforeValidator(self._yaml_float)] if lenient else []
            return Annotated[(float, pd.Strict(), *hook)]
        if origin is Literal:
            spelled = {b: [a for a in args if isinstance(a, str) and a.lower() in words]
                       for b, words in ((True, ("yes", "on", "true")), (False, ("no", "off", "false")))}
            hook = [pd.BeforeValidator(lambda v: spelled[v][0] if isinstance(v, bool) and len(spelled[v]) == 1
                                       else v)] if lenient else []
            return Annotated[(tp, *hook)] if hook else tp
        if origin is list:
            return Annotated[list[self.view(args[0], lenient)], pd.Strict()]
        if origin is tuple:
            return tuple[tuple(self.view(a, lenient) for a in args)]
        if args and type(None) in args:
            return Union[tuple(self.view(a, lenient) for a in args)]
        return tp

    @staticmethod
    def _yaml_float(value: Any) -> Any:
        import pydantic

        if isinstance(value, str):
            try:
                return pydantic.TypeAdapter(float, config=pydantic.ConfigDict(allow_inf_nan=False)).validate_python(value)
            except pydantic.ValidationError:
                pass
        return value

    def check(self, tp: Any, value: Any, strict: bool) -> Any:
        return self.pd.TypeAdapter(self.view(tp, not strict)).validate_python(value)

    def load(self, cls: type, data: dict) -> Any:
        # spo walks the sections itself (their class may be a subclass: objective.name picks it) and
        # checks each key with its own adapter; done the same way here.
        problems: list[str] = []
        kinds: list[str] = []
        instance = cls()

        def walk(obj: Any, mapping: dict, prefix: str) -> None:
            from typing import get_type_hints

            hints = get_type_hints(type(obj))
            for key, value in mapping.items():
                tp = hints[key]
                if dataclasses.is_dataclass(tp):
                    walk(getattr(obj, key), value, f"{prefix}{key}.")
                    continue
                try:
                    setattr(obj, key, self.check(tp, value, strict=False))
                except self.pd.ValidationError as exc:
                    problems.extend(f"{prefix}{key}{''.join(f'[{i}]' for i in e['loc'] if isinstance(i, int))}: "
                                    f"{e['msg']}" for e in exc.errors())
                    kinds.extend(e["type"] for e in exc.errors())

        walk(instance, data, "")
        if problems:
            raise _Collected(problems, kinds)
        return instance

    def errors(self, exc: Exception) -> list[str]:
        return exc.problems if isinstance(exc, _Collected) else super().errors(exc)

    def kinds(self, exc: Exception) -> list[str]:
        return exc.kinds if isinstance(exc, _Collected) else super().kinds(exc)


class _Collected(Exception):
    def __init__(self, problems: list[str], kinds: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems, self.kinds = problems, kinds


class OmegaConfCandidate(Candidate):
    name, package = "omegaconf (structured)", "omegaconf"

    def __init__(self) -> None:
        import omegaconf

        self.oc = omegaconf

    def check(self, tp: Any, value: Any, strict: bool) -> Any:
        probe = dataclasses.make_dataclass("Probe", [("x", tp, dataclasses.field(default=self.oc.MISSING))])
        base = self.oc.OmegaConf.structured(probe)
        return self.oc.OmegaConf.to_object(self.oc.OmegaConf.merge(base, {"x": value})).x

    def load(self, cls: type, data: dict) -> Any:
        base = self.oc.OmegaConf.structured(cls)
        return self.oc.OmegaConf.to_object(self.oc.OmegaConf.merge(base, data))

    def errors(self, exc: Exception) -> list[str]:
        key = getattr(exc, "full_key", None)
        return [f"{key}: {type(exc).__name__}: {str(exc).splitlines()[0]}" if key else super().errors(exc)[0]]


class DraccusCandidate(Candidate):
    name, package = "draccus (decode)", "draccus"

    def __init__(self) -> None:
        import draccus

        self.dr = draccus

    def check(self, tp: Any, value: Any, strict: bool) -> Any:
        return self.dr.decode(tp, value)

    def load(self, cls: type, data: dict) -> Any:
        return self.dr.decode(cls, data)


# --------------------------------------------------------------------------- the survey


def _run(candidate: Candidate, fn: Callable[[], Any]) -> tuple[bool, Any, Exception | None]:
    try:
        return True, fn(), None
    except Exception as exc:  # every library raises its own kind
        return False, None, exc


def survey(candidate: Candidate) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for behaviour, tp, value, mode, today, canonical in CASES:
        accepted, result, exc = _run(candidate, lambda: candidate.check(tp, value, mode == "strict"))
        if today == OK:
            kept = accepted and _same(result, canonical)
        else:
            kept = not accepted
        got = f"{result!r} ({type(result).__name__})" if accepted else candidate.errors(exc)[0]
        rows[behaviour] = {"kept": kept, "got": got[:160]}

    ok, result, exc = _run(candidate, lambda: candidate.load(Root, NESTED))
    kept = ok and result.seed == 7 and result.pools.k == 3 and result.pools.threshold == 0.3 and \
        result.optim.betas == (0.8, 0.95) and result.train.mixed_precision == "fp16"
    rows["nested dataclass sections (mapping -> instances, defaults kept)"] = {
        "kept": kept, "got": type(result).__name__ if ok else candidate.errors(exc)[0][:160]}

    ok, _, exc = _run(candidate, lambda: candidate.load(Root, {"optim": {"betas": [0.9, "x"]}}))
    joined = "" if ok else " ".join(candidate.errors(exc))
    rows["error names the key path and list index (optim.betas[1])"] = {
        "kept": "optim" in joined and "betas" in joined and "1" in joined.split("betas", 1)[1][:6],
        "got": joined[:160]}
    ok, _, exc = _run(candidate, lambda: candidate.load(Root, BAD_NESTED))
    messages = [] if ok else candidate.errors(exc)
    rows["every problem reported at once (3 here)"] = {"kept": len(messages) >= 3, "got": len(messages)}
    kinds = [] if ok else candidate.kinds(exc)
    rows["machine-readable kind per error (to keep spo's messages)"] = {"kept": bool(kinds), "got": kinds[:3]}
    rows["one library call checks a bare annotation (key=value override)"] = {
        "kept": rows["X or null: a value"]["kept"] and rows["list[int]: a list"]["kept"], "got": ""}
    before = {c: set(vars(c)) for c in (Root, Pools, Optim, Lora, Train, Method, SPOMethod)}
    ok, _, exc = _run(candidate, lambda: candidate.load(Root, {}))
    added = sorted(f"{c.__name__}.{a}" for c, names in before.items() for a in set(vars(c)) - names)
    rows["schema stays plain stdlib dataclasses (nothing declared or added for the library)"] = {
        "kept": ok and not added, "got": added or ("ok" if ok else candidate.errors(exc)[0][:160])}

    ok, result, exc = _run(candidate, lambda: candidate.load(Root, {"objective": {"beta": 0.1}}))
    rows["section of a run-time subclass (objective.name) keeps its class and fields"] = {
        "kept": ok and type(result.objective) is SPOMethod and result.objective.beta == 0.1,
        "got": repr(result.objective)[:160] if ok else candidate.errors(exc)[0][:160]}

    real, why = _real_schema()
    if real is None:
        rows["real schema: SPOConfig() defaults round-trip"] = {"kept": None, "got": f"skipped: {why}"}
    else:
        ok, result, exc = _run(candidate, lambda: candidate.load(real, dataclasses.asdict(real())))
        rows["real schema: SPOConfig() defaults round-trip"] = {
            "kept": ok and result == real(),
            "got": ("equal" if result == real() else f"differs: objective={result.objective!r}"[:160]) if ok
            else candidate.errors(exc)[0][:160]}
    return rows


def _real_schema() -> tuple[type | None, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    try:
        from spo.config.schema import SPOConfig

        SPOConfig()  # the default objective section is found through the methods' registry (torch)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return SPOConfig, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON table here")
    args = parser.parse_args(argv)

    table: dict[str, Any] = {"python": sys.version.split()[0], "libraries": {}, "rows": {}}
    for cls in (PydanticProfile, PydanticLax, PydanticStrict, OmegaConfCandidate, DraccusCandidate):
        try:
            candidate = cls()
            version = importlib.metadata.version(cls.package)
        except ImportError as exc:
            table["libraries"][cls.name] = f"not installed ({exc})"
            continue
        table["libraries"][cls.name] = version
        for behaviour, cell in survey(candidate).items():
            table["rows"].setdefault(behaviour, {})[cls.name] = cell

    names = [n for n, v in table["libraries"].items() if not str(v).startswith("not installed")]
    table["kept"] = {n: sum(r[n]["kept"] is True for r in table["rows"].values() if n in r) for n in names}
    table["of"] = {n: sum(n in r and r[n]["kept"] is not None for r in table["rows"].values()) for n in names}
    text = json.dumps(table, indent=1, default=repr)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    # the markdown summary (docs/configuration.md)
    print("\n| behaviour | " + " | ".join(names) + " |", file=sys.stderr)
    print("|---|" + "---|" * len(names), file=sys.stderr)
    for behaviour, cells in table["rows"].items():
        marks = [{True: "kept", False: "**lost**", None: "skipped"}[cells[n]["kept"]] for n in names]
        print(f"| {behaviour} | " + " | ".join(marks) + " |", file=sys.stderr)
    print("| **kept, of** | " + " | ".join(f"{table['kept'][n]} / {table['of'][n]}" for n in names) + " |",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
