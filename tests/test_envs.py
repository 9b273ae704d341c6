"""shardllm.envs: every SHARDLLM_* name in the package is registered and read through it, the defaults are those the
call sites had before the registry, values are read when accessed, and `shardllm envs` prints the table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardllm import envs
from shardllm.entrypoints import cli

PACKAGE = Path(envs.__file__).resolve().parents[1]
NAME = re.compile(r"\bSHARDLLM_[A-Z0-9_]*[A-Z0-9]\b")
# SHARDLLM_ strings that are not environment variables: the prefix of bench's result line on stdout.
NOT_VARIABLES = {"SHARDLLM_BENCH_RESULT"}
# A direct read of a SHARDLLM_ variable. healthcheck.py runs by path in the container without importing the
# package (stdlib only, see its docstring), so it reads SHARDLLM_HOST itself.
DIRECT_READ = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']SHARDLLM_""")
MAY_READ_DIRECTLY = {"envs/__init__.py", "entrypoints/healthcheck.py"}

# Each value with the variable unset, as the os.environ reads it replaced computed it.
DEFAULTS = {
    "SHARDLLM_HOST": None, "SHARDLLM_API_KEY": None, "SHARDLLM_INIT_TIMEOUT": 1800.0, "SHARDLLM_STEP_TIMEOUT": 60.0,
    "SHARDLLM_RAY_PG_TIMEOUT": 120.0, "SHARDLLM_RAY_ENV_VARS": (), "SHARDLLM_NUM_NODES": None,
    "SHARDLLM_PROFILE_DIR": None, "SHARDLLM_PROFILE_STEPS": "8:16", "SHARDLLM_PROFILE_TOP": 15,
    "SHARDLLM_PROFILE_SKIP_ALL_REDUCE": False, "SHARDLLM_WORKER_WAIT_FOR_PLANS": True,
    "SHARDLLM_PP_EXTRA_MICROBATCH": True, "SHARDLLM_PP_SHARED_MAX_SEQS": False, "SHARDLLM_TP_OVERLAP": False,
    "SHARDLLM_TP_OVERLAP_AT_TP1": False, "SHARDLLM_TP_OVERLAP_PREFILL": False,
    "SHARDLLM_TP_OVERLAP_PREFILL_MIN_TOKENS": 2048, "SHARDLLM_KV_V_T_TILED_WRITE": False,
    "SHARDLLM_DECODE_FUSED_ROTARY": 128,
    "SHARDLLM_TP_OVERLAP_MIN_TOKENS": 64, "SHARDLLM_TP_OVERLAP_SM_CARVEOUT": 0, "SHARDLLM_SYMM_MEM_MAX_MB": 8.0,
    "SHARDLLM_GEMV_TABLES": True, "SHARDLLM_GEMV_NEAREST_SHAPE": True,
    "SHARDLLM_DECODE_STREAM": True, "SHARDLLM_ENGINE_PROCESS": True,
    "SHARDLLM_FRONTEND_DETOKENIZE": None, "SHARDLLM_PDL": True, "SHARDLLM_GEMV_W_EARLY": 2,
    "SHARDLLM_GEMV_FUSED_SILU": True,
    "SHARDLLM_DECODE_ATTN_TUNED": True,
    "SHARDLLM_DECODE_CONFIGS": None, "SHARDLLM_GEMV_CONFIGS": None, "SHARDLLM_PREFILL_CONFIG": None,
    "SHARDLLM_GRAPH_LM_HEAD": False, "SHARDLLM_KV_SCALES_IN_KERNELS": True,
    "SHARDLLM_MIXED_STEP_DECODE_KERNEL": True, "SHARDLLM_FLASH_PREFILL": False, "SHARDLLM_KERNEL_WARM_UP": True,
    "SHARDLLM_FP8_ATTN_F16_DOT": True, "SHARDLLM_FP8_FAST_ACCUM_MAX_K": 8192,
    "SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT": 1 << 20, "SHARDLLM_FP8_TENSORWISE_FP32": False,
    "SHARDLLM_FP8_GEMV_MAX_M": 1, "SHARDLLM_FP8_DEFER_SCALE": True,
    "SHARDLLM_FP8_FUSED_ACT_QUANT": True, "SHARDLLM_FP8_BLOCK_MOE_TRITON": False, "SHARDLLM_KV_V_TRANSPOSED": True,
    "SHARDLLM_TRITON_ARGMAX": True,
    "SHARDLLM_MOE_FUSED_GLUE": True,
}


def _sources() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_every_shardllm_name_in_the_package_is_registered_and_every_registered_one_is_used():
    sources = _sources()
    unregistered = {f"{path}: {name}" for path, text in sources.items() for name in NAME.findall(text)
                    if name not in envs.ENV_VARS and name not in NOT_VARIABLES}
    assert not unregistered, "register these in shardllm/envs/__init__.py (_VARS): " + ", ".join(sorted(unregistered))
    used = {name for path, text in sources.items() if not path.startswith("envs/") for name in NAME.findall(text)}
    assert set(envs.ENV_VARS) - used == set(), "registered but read nowhere: remove or use them"


def test_no_module_reads_a_shardllm_variable_from_the_environment_itself():
    direct = [f"{path}:{text[:m.start()].count(chr(10)) + 1}" for path, text in _sources().items()
              if path not in MAY_READ_DIRECTLY for m in DIRECT_READ.finditer(text)]
    assert not direct, f"read these through shardllm.envs: {direct}"


def test_defaults_are_unchanged(monkeypatch):
    assert set(DEFAULTS) == set(envs.ENV_VARS)
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    assert {name: getattr(envs, name) for name in DEFAULTS} == DEFAULTS
    assert not any(envs.is_set(name) for name in DEFAULTS)


@pytest.mark.parametrize("raw, on_by_default, off_by_default", [
    ("0", False, False), ("1", True, True), ("", True, False),  # as the old `!= "0"` and `== "1"` comparisons
    ("true", True, True), ("Yes", True, True), (" ON ", True, True),
    ("false", False, False), ("NO", False, False), ("off", False, False),
    ("maybe", True, False), ("2", True, False)])  # invalid text: the default, never an exception
def test_switches_parse_words_and_keep_the_default_on_bad_text(monkeypatch, raw, on_by_default, off_by_default):
    monkeypatch.setenv("SHARDLLM_GEMV_TABLES", raw)
    monkeypatch.setenv("SHARDLLM_GRAPH_LM_HEAD", raw)
    assert envs.SHARDLLM_GEMV_TABLES is on_by_default
    assert envs.get("SHARDLLM_GRAPH_LM_HEAD") is off_by_default
    invalid = raw.strip().lower() not in ("", "0", "1", "true", "yes", "on", "false", "no", "off")
    if invalid:  # the table's strict read names the variable and the accepted words
        with pytest.raises(ValueError, match=r"SHARDLLM_GEMV_TABLES=.* is not a valid bool \(expected one of 1, true"):
            envs.ENV_VARS["SHARDLLM_GEMV_TABLES"].value(strict=True)


def test_a_bad_switch_is_logged_once_and_shown_invalid(monkeypatch, caplog, capsys):
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP", "enabled")
    with caplog.at_level("WARNING", logger="shardllm.envs"):
        assert [envs.SHARDLLM_TP_OVERLAP for _ in range(3)] == [False] * 3
    assert [r.getMessage() for r in caplog.records].count(
        "SHARDLLM_TP_OVERLAP='enabled' is not a valid bool (expected one of 1, true, yes, on or 0, false, no, off): "
        "fix or unset it; using the default") == 1
    assert cli.main(["envs", "--set"]) == 1  # exit status 1: a start script's check fails
    captured = capsys.readouterr()
    row = next(line.split() for line in captured.out.splitlines() if line.startswith("SHARDLLM_TP_OVERLAP "))
    assert row[1:5] == ["bool", "off", "invalid", "*"] and "'enabled' is not a valid bool" in captured.out
    assert "invalid: SHARDLLM_TP_OVERLAP (the engine uses the default" in captured.err
    monkeypatch.setenv("SHARDLLM_STEP_TIMEOUT", "soon")  # not lenient: an error where it is read
    assert cli.main(["envs", "--set"]) == 1
    err = capsys.readouterr().err
    assert "invalid: SHARDLLM_STEP_TIMEOUT (an error where the engine reads it" in err
    assert "SHARDLLM_TP_OVERLAP (the engine uses the default" in err
    monkeypatch.delenv("SHARDLLM_STEP_TIMEOUT")
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP", "on")
    assert cli.main(["envs", "--set"]) == 0 and envs.invalid_names() == []


def test_envs_into_a_closed_pipe_ends_quietly():
    """`shardllm envs --set | head`: the reader gone before the table is written is no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "shardllm.envs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=PACKAGE.parent)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err


def test_values_are_read_at_each_access(monkeypatch):
    monkeypatch.setenv("SHARDLLM_STEP_TIMEOUT", "9")
    monkeypatch.setenv("SHARDLLM_RAY_ENV_VARS", " A, B,,")
    monkeypatch.setenv("SHARDLLM_HOST", "")  # empty counts as unset, as `os.environ.get(...) or None` did
    assert (envs.SHARDLLM_STEP_TIMEOUT, envs.SHARDLLM_RAY_ENV_VARS, envs.SHARDLLM_HOST) == (9.0, ("A", "B"), None)
    assert envs.is_set("SHARDLLM_HOST") and not envs.is_given("SHARDLLM_HOST")
    assert envs.is_given("SHARDLLM_STEP_TIMEOUT")
    monkeypatch.setenv("SHARDLLM_STEP_TIMEOUT", "2.5")
    assert envs.SHARDLLM_STEP_TIMEOUT == 2.5
    assert envs.get("SHARDLLM_PROFILE_TOP", {"SHARDLLM_PROFILE_TOP": "3"}) == 3  # a given mapping, not os.environ


def test_bad_values_and_unknown_names_fail_clearly(monkeypatch):
    monkeypatch.setenv("SHARDLLM_INIT_TIMEOUT", "ten")
    with pytest.raises(ValueError, match=r"SHARDLLM_INIT_TIMEOUT='ten' is not a valid float"):
        _ = envs.SHARDLLM_INIT_TIMEOUT
    with pytest.raises(AttributeError, match="SHARDLLM_NO_SUCH"):
        _ = envs.SHARDLLM_NO_SUCH
    with pytest.raises(KeyError, match="add an EnvVar"):
        envs.get("SHARDLLM_NO_SUCH")
    with pytest.raises(KeyError, match="add an EnvVar"):
        envs.is_set("SHARDLLM_NO_SUCH")
    assert envs.is_set("SHARDLLM_INIT_TIMEOUT")  # set, though invalid: is_set does not parse


def test_cli_prints_the_table_with_current_values_and_hides_the_api_key(monkeypatch, capsys):
    for name in envs.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHARDLLM_API_KEY", "sk-do-not-print")
    monkeypatch.setenv("SHARDLLM_GEMV_TABLES", "0")
    monkeypatch.setenv("SHARDLLM_PROFILE_TOP", "many")
    monkeypatch.setenv("SHARDLLM_GEMV_TABLE", "0")  # a typo
    assert cli.main(["envs"]) == 1  # SHARDLLM_PROFILE_TOP's value is invalid
    out = capsys.readouterr().out
    assert "sk-do-not-print" not in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("SHARDLLM_")}
    assert set(rows) == set(envs.ENV_VARS)
    assert rows["SHARDLLM_API_KEY"][2:4] == ["<set>", "*"]
    assert rows["SHARDLLM_GEMV_TABLES"] == ["bool", "on", "off", "*", "import"]
    assert rows["SHARDLLM_INIT_TIMEOUT"] == ["float", "1800.0", "1800.0", "import"]
    assert rows["SHARDLLM_PROFILE_TOP"][2:4] == ["invalid", "*"] and "'many' is not a valid int" in out
    assert "(a typo? nothing reads them): SHARDLLM_GEMV_TABLE" in out
    assert cli.main(["envs", "--set"]) == 1
    only_set = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("SHARDLLM_")}
    assert only_set == {"SHARDLLM_API_KEY", "SHARDLLM_GEMV_TABLES", "SHARDLLM_PROFILE_TOP"}
    assert "none set" not in envs.table(only_set=True)
    assert "(none set: every variable has its default" in envs.table(environ={}, only_set=True)


@pytest.mark.parametrize("name,default", [("SHARDLLM_DECODE_FUSED_ROTARY", 128),
                                          ("SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT", 1 << 20),
                                          ("SHARDLLM_FP8_GEMV_MAX_M", 1),
                                          ("SHARDLLM_FP8_FAST_ACCUM_MAX_K", 8192)])
def test_int_bounds_read_words_empty_and_bad_values(name, default):
    """The bounds whose 0 turns a feature off: unset / empty / on give the default, off / false give 0, digits the
    number; a negative or non-numeric value is invalid (the default with a warning, and flagged in the table)."""
    var = envs.ENV_VARS[name]
    cases = {None: default, "": default, "on": default, "TRUE": default, "off": 0, "false": 0, "0": 0, "1": 1,
             " 16 ": 16}
    for raw, want in cases.items():
        assert var.value({} if raw is None else {name: raw}) == want, raw
    for bad in ("-5", "abc", "1.5"):
        with pytest.raises(ValueError, match=name):
            var.value({name: bad}, strict=True)
        assert var.value({name: bad}) == default


def test_fp8_gemv_rows_bound_is_capped_at_the_kernels_rows():
    """SHARDLLM_FP8_GEMV_MAX_M above the GEMV's 16 rows is invalid, with the range in the message."""
    var = envs.ENV_VARS["SHARDLLM_FP8_GEMV_MAX_M"]
    assert var.value({"SHARDLLM_FP8_GEMV_MAX_M": "16"}) == 16
    with pytest.raises(ValueError, match=r"0\.\.16"):
        var.value({"SHARDLLM_FP8_GEMV_MAX_M": "17"}, strict=True)
    assert var.value({"SHARDLLM_FP8_GEMV_MAX_M": "17"}) == 1  # the default, with a warning


@pytest.mark.parametrize("name, bad, good", [
    ("SHARDLLM_STEP_TIMEOUT", ("0", "-5", "nan", "-inf"), ("0.5", "60", "inf")),  # inf: no limit (debugging)
    ("SHARDLLM_INIT_TIMEOUT", ("0", "-1", "nan"), ("1800", "inf")),
    ("SHARDLLM_RAY_PG_TIMEOUT", ("0", "-120", "nan"), ("120",)),
    ("SHARDLLM_NUM_NODES", ("0", "-2"), ("1", "4")),
    ("SHARDLLM_PROFILE_TOP", ("0", "-3"), ("1", "15")),
    ("SHARDLLM_SYMM_MEM_MAX_MB", ("0", "-8", "0.5", "inf", "nan"), ("1", "8", "32")),
    ("SHARDLLM_TP_OVERLAP_MIN_TOKENS", ("0", "1", "-64"), ("2", "64")),
    ("SHARDLLM_TP_OVERLAP_PREFILL_MIN_TOKENS", ("0", "-1"), ("2", "2048")),
    ("SHARDLLM_TP_OVERLAP_SM_CARVEOUT", ("-1",), ("0", "16")),
    ("SHARDLLM_GEMV_W_EARLY", ("-1", "3"), ("0", "1", "2")),
])
def test_numeric_variables_have_bounds(name, bad, good, monkeypatch, capsys):
    """A timeout of 0 s, a negative size or count, a mode out of its range is invalid where the variable is read
    (naming it and the range) and in `shardllm envs` (exit status 1), not accepted and failing later (a
    SHARDLLM_STEP_TIMEOUT of 0 failed the first step with "worker rank 0 did not answer within 0s")."""
    var = envs.ENV_VARS[name]
    assert not var.lenient  # an error where it is read, as for text that is no number
    for raw in bad:
        with pytest.raises(ValueError, match=rf"{name}='{re.escape(raw)}' is not a valid {var.type} \(must be "):
            var.value({name: raw})
        monkeypatch.setenv(name, raw)
        assert envs.invalid_names() == [name]
        assert cli.main(["envs", "--set"]) == 1
        assert f"invalid: {name} (an error where the engine reads it" in capsys.readouterr().err
    for raw in good:
        assert var.value({name: raw}) == (float if var.type == "float" else int)(raw)
    assert var.value({}) == DEFAULTS[name]


def test_an_unset_node_count_stays_unset():
    assert envs.ENV_VARS["SHARDLLM_NUM_NODES"].value({}) is None
