"""Every benchmark runs at its smallest size (``--smoke``), so none can rot.

The numbers are timings and cannot be checked; what is checked is that each
table has the expected rows and peers, that measured values are finite and
positive, and that the derived columns follow from them (ratios, bytes).
What each peer computes is checked by the benchmarks themselves before any
timing (``_common.check_runners``): a peer that is not gax.gradient_ascent's
math, or a gax that does not ascend, stops the run; the last tests here show
that this check catches a wrong peer.
"""

import contextlib
import io
import json
import logging
import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import _common
from benchmarks import compile_time
from benchmarks import gpu
from benchmarks import logging_overhead
from benchmarks import memory
from benchmarks import plot
from benchmarks import step_time
from tests import _optional

HAS_TORCH = _optional.available("torch")  # as benchmarks.step_time decides
JAX_PEERS = {"gax", "optax chain", "hand-fused", "maximize(adam)", "probe"}
TORCH_PEERS = {"torch foreach", "torch for-loop"}


def _positive(value):
  return value is not None and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def step_time_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "step_time.json"
  rows = step_time.main(["--smoke", "--json", str(path)])
  return rows, path


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_step_time_has_every_case_and_peer(step_time_run, capsys):
  rows, _ = step_time_run
  cases = {(row["config"], row["params"], row["leaves"], row["peer"]) for row in rows}
  expected = {
    (config, 10_000, leaves, peer)
    for config in ("default", "clip+warmup+decay+nesterov")
    for leaves in (1, 10)
    for peer in JAX_PEERS | TORCH_PEERS
  }
  assert cases == expected and len(rows) == len(expected)


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_step_time_numbers_are_positive_and_ratios_consistent(step_time_run):
  rows, _ = step_time_run
  for row in rows:
    if row["peer"] in JAX_PEERS:
      assert _positive(row["seconds"]), row
      assert row["gbps"] == pytest.approx(28 * row["params"] / row["seconds"] / 1e9)
    if row["peer"] == "optax chain":
      assert row["vs_optax"] == 1.0
    if row["peer"] == "hand-fused":
      assert row["vs_floor"] == 1.0
    if row["peer"] == "probe":
      assert row["of_probe"] == 1.0
  by_case = {}
  for row in rows:
    by_case.setdefault((row["config"], row["leaves"]), {})[row["peer"]] = row
  for peers in by_case.values():
    gax, chain = peers["gax"], peers["optax chain"]
    assert gax["vs_optax"] == pytest.approx(gax["seconds"] / chain["seconds"])


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_step_time_torch_rows_only_where_comparable(step_time_run):
  rows, _ = step_time_run
  for row in rows:
    if row["peer"] not in TORCH_PEERS:
      continue
    comparable = HAS_TORCH and row["config"] == "default"  # RMSprop has no Nesterov
    assert _positive(row["seconds"]) if comparable else row["seconds"] is None, row


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_torch_peers_are_timed(step_time_run):
  """Without torch the PyTorch rows are n/a: skipped locally, an error in CI."""
  if not HAS_TORCH:
    _optional.missing("torch is not importable: step_time has no PyTorch peers")
  rows, _ = step_time_run
  timed = {row["peer"] for row in rows if row["seconds"] is not None}
  assert TORCH_PEERS <= timed


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_plot_writes_a_small_png_with_every_peer(step_time_run, tmp_path):
  _, path = step_time_run
  output = tmp_path / "step_time.png"
  peers = plot.main([str(path), "-o", str(output)])
  expected = JAX_PEERS | (TORCH_PEERS if HAS_TORCH else set())
  assert set(peers) == expected
  data = output.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 200_000
  assert json.loads(path.read_text())["environment"]["machine"]


def test_compile_time_shapes_give_leaves_of_that_many_sizes():
  leaves = compile_time.leaves_of_shapes(7, 2, 3)
  assert [leaf.shape for leaf in leaves] == [(2,), (3,), (4,), (2,), (3,), (4,), (2,)]


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_compile_time_smoke(capsys):
  rows = compile_time.main(["--smoke"])
  assert [(row["leaves"], row["peer"]) for row in rows] == [
    (10, compile_time.GAX_LOG),
    (10, compile_time.GAX_OFF),
    (10, compile_time.OPTAX),
    (10, compile_time.OPTAX_NORM),
  ]
  for row in rows:
    assert _positive(row["lower_s"]) and _positive(row["compile_s"]), row
  assert rows[2]["vs_optax"] == 1.0 and rows[2]["lower_vs_optax"] == 1.0
  assert all(row["shapes"] == 1 for row in rows)
  out = capsys.readouterr().out
  assert "| default | 10 | 1 | gax (logging off) |" in out
  # The logging on / off table: off, on, their ratio, then the global-norm peer.
  off, on = (compile_time._common.fmt_time(row["total_s"]) for row in rows[1::-1])
  ratio = rows[0]["total_s"] / rows[1]["total_s"]
  assert f"| default | 10 | {off} | {on} | {ratio:.2f}x |" in out


@pytest.fixture(scope="module")
def logging_overhead_run():
  logger = logging.getLogger("gradient_ascent_jax")
  before = logger.level, logger.propagate, list(logger.handlers)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rows = logging_overhead.main(["--smoke"])
  assert (logger.level, logger.propagate, list(logger.handlers)) == before  # restored
  return rows, out.getvalue()


def test_logging_overhead_compiles_instances_in_alternating_orders():
  # Two executables of one step can run several percent apart on XLA:CPU: each
  # peer is built twice, first in the table's order, then in the reverse one.
  built = []

  def build():
    built.append(len(built))
    return {"off": ("off", built[-1]), "state": ("state", built[-1])}

  runners = logging_overhead._instances(build, 3)
  assert list(runners) == [
    ("off", 0),
    ("state", 0),
    ("state", 1),
    ("off", 1),
    ("off", 2),
    ("state", 2),
  ]
  assert runners["state", 1] == ("state", 1) and built == [0, 1, 2]
  samples = {("off", 0): [1.0, 2.0], ("off", 1): [3.0, 4.0], ("state", 0): [5.0, 5.0]}
  times, records = logging_overhead._per_peer(samples, {("off", 0): 1, ("off", 1): 2})
  assert times == {"off": [2.0, 3.0], "state": [5.0, 5.0]} and records == {"off": 3}


@pytest.mark.slow  # runs a benchmark (up to 60 s, shared with the next test)
def test_logging_overhead_smoke_logs_every_tenth_step(logging_overhead_run):
  rows, out = logging_overhead_run
  rows = [row for row in rows if "model" not in row]
  assert [row["peer"] for row in rows] == [
    logging_overhead.LOGGING,
    logging_overhead.LOGGING_VALUE,
    logging_overhead.LOGGING_STATE,
    logging_overhead.LOGGING_VALUE_STATE,
    logging_overhead.OFF,
    logging_overhead.OFF_VALUE,
    logging_overhead.DEFAULT,
    logging_overhead.VMAP_LOGGING,
    logging_overhead.VMAP_LOGGING_VALUE,
    logging_overhead.VMAP_OFF,
  ]
  assert all(_positive(row["seconds"]) for row in rows)
  overhead = {row["peer"]: row["overhead"] for row in rows}
  assert overhead[logging_overhead.OFF] == overhead[logging_overhead.VMAP_OFF] == 0.0
  assert "| default gradient_ascent() |" in out
  assert "| logging every 10, value= |" in out
  assert "| logging every 10, value= (state) |" in out
  assert "| vmap 8, logging every 10, value= |" in out
  # 3 timed samples of 10 steps of each of 2 instances: one record per sample for
  # each logging peer, sent by callback or read from the state (vmapped peers
  # included); none with logging off.
  logged = {row["peer"]: row["records"] for row in rows}
  assert logged == {peer: 2 * 3 if "every 10" in peer else 0 for peer in logged}


@pytest.mark.slow  # runs a benchmark (up to 60 s, shared with the test above)
def test_logging_overhead_smoke_model_rows(logging_overhead_run):
  if not _optional.available("flax"):
    _optional.missing("flax is not importable: logging_overhead has no model rows")
  rows, out = logging_overhead_run
  rows = [row for row in rows if "model" in row]
  scan = "lax.scan of 20"  # --smoke's scan: two logging intervals per call
  peers = (
    logging_overhead.MODEL_OFF,
    logging_overhead.MODEL_CALLBACK,
    logging_overhead.MODEL_STATE,
  )
  assert [(row["model"], row["loop"], row["peer"]) for row in rows] == [
    ("mlp", loop, peer) for peer in peers for loop in (logging_overhead.PYTHON_LOOP, scan)
  ]
  assert all(_positive(row["seconds"]) for row in rows)
  for row in rows:
    if row["peer"] == logging_overhead.MODEL_OFF:
      assert row["overhead"] == 0.0
  logged = {(row["loop"], row["peer"]): row["records"] for row in rows}
  # A Python loop logs one record per 10 steps on both paths. A scan call of 20
  # steps sends two by callback, but its state holds only the last one: the
  # reader, called once per call, logs one. Each of 2 instances, 3 samples.
  assert logged == {
    (logging_overhead.PYTHON_LOOP, logging_overhead.MODEL_OFF): 0,
    (logging_overhead.PYTHON_LOOP, logging_overhead.MODEL_CALLBACK): 2 * 3,
    (logging_overhead.PYTHON_LOOP, logging_overhead.MODEL_STATE): 2 * 3,
    (scan, logging_overhead.MODEL_OFF): 0,
    (scan, logging_overhead.MODEL_CALLBACK): 2 * 6,
    (scan, logging_overhead.MODEL_STATE): 2 * 3,
  }
  assert "| mlp | 13,002 | 6 | python loop | every 10, state |" in out


@pytest.mark.slow  # runs a benchmark (about 20 s)
def test_logging_overhead_smoke_nnx_rows():
  if not _optional.available("flax"):
    _optional.missing("flax is not importable: logging_overhead has no model rows")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rows = logging_overhead.main(["--smoke", "--models", "nnx"])
  rows = [row for row in rows if "model" in row]  # --smoke times a small case too
  peers = (
    logging_overhead.MODEL_OFF,
    logging_overhead.MODEL_CALLBACK,
    logging_overhead.MODEL_STATE,
  )
  assert [(row["model"], row["loop"], row["peer"]) for row in rows] == [
    ("nnx mlp", loop, peer) for peer in peers for loop in logging_overhead.NNX_LOOPS
  ]
  assert all(_positive(row["seconds"]) for row in rows)
  # Every loop logs one record per 10 steps on both paths: the reader finds them in
  # the nnx.Optimizer and in the State of nnx.split.
  assert {(row["loop"], row["peer"]): row["records"] for row in rows} == {
    (loop, peer): 0 if peer == logging_overhead.MODEL_OFF else 2 * 3  # 2 instances
    for peer in peers
    for loop in logging_overhead.NNX_LOOPS
  }
  assert "| nnx mlp | 610 | 4 | python loop, jax.jit of nnx.split | every 10, state |" in (
    out.getvalue()
  )


def test_paired_overhead_compares_samples_of_one_repeat():
  # The machine slows down during the run (1x to 2x); the peer costs 10% more than
  # off in every repeat: +10%, with an interval of no width.
  base = [1.0 + 0.05 * repeat for repeat in range(21)]
  peer = [1.1 * b for b in base]
  overhead, low, high = logging_overhead.paired_overhead(peer, base)
  assert overhead == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
  # Each ratio is of one repeat: paired with another repeat's samples, the same
  # times are no longer +10%.
  rotated = base[5:] + base[:5]
  assert logging_overhead.paired_overhead(peer, rotated)[0] < 0.09


def test_paired_overhead_interval_holds_the_median_of_noisy_ratios():
  ratios = [1.02, 1.05, 0.99, 1.04, 1.08, 1.01, 1.03, 1.06, 1.00, 1.05, 1.02]
  base = [2.0 + 0.1 * i for i in range(len(ratios))]
  overhead, low, high = logging_overhead.paired_overhead(
    [r * b for r, b in zip(ratios, base, strict=True)], base
  )
  assert overhead == pytest.approx(0.03)  # the median of the ratios, less 1
  assert low < overhead < high
  assert low >= min(ratios) - 1 and high <= max(ratios) - 1


@pytest.mark.parametrize(("name", "params", "leaves"), [("mlp", 669_706, 6), ("cnn", 824_458, 8)])
def test_logging_overhead_models_have_the_stated_size(name, params, leaves):
  models = _optional.import_module("benchmarks._models", "pip install flax")
  model = {"mlp": models.MLP(), "cnn": models.CNN()}[name]
  shape = {"mlp": (64, 784), "cnn": (32, 28, 28, 1)}[name]
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == params
  assert len(jax.tree.leaves(shapes)) == leaves


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_memory_smoke_state_bytes_and_peak():
  rows = memory.main(["--smoke"])
  table = {(row["config"], row["peer"]): row for row in rows}
  assert len(table) == len(rows) == 8
  n = 10_000
  # Two float32 moments (+ an int32 step counter), or two bfloat16 moments.
  for config in ("default", "clip+warmup+decay+nesterov"):
    assert table[config, memory.GAX]["state_bytes"] == 2 * 4 * n + 4
    assert table[config, memory.GAX_BF16]["state_bytes"] == 2 * 2 * n + 4
  full = "clip+warmup+decay+nesterov"
  assert table[full, memory.GAX]["peak_bytes"] <= table[full, memory.OPTAX]["peak_bytes"]
  # With a constant rate the Optax chain keeps no step counter; gax keeps its
  # int32 one, so only scalar bytes may differ: no buffer of n elements.
  assert table["default", memory.OPTAX]["state_bytes"] == 2 * 4 * n
  extra = table["default", memory.GAX]["peak_bytes"] - table["default", memory.OPTAX]["peak_bytes"]
  assert extra <= 16


@pytest.mark.parametrize(
  ("output", "want"),
  [
    ("..\n2 passed in 0.5s\n", "2 passed in 0.5s"),
    # --durations (say from PYTEST_ADDOPTS) and warnings add sections headed by "=" lines.
    (
      "..\n=== slowest 2 durations ===\n1.00s call tests/test_a.py::t\n\n"
      "=== warnings summary ===\ntests/test_a.py::t\n  UserWarning: w\n\n"
      "2 passed, 1 warning in 1.2s\n",
      "2 passed, 1 warning in 1.2s",
    ),
    (
      "F.\n=== FAILURES ===\n___ t ___\n=== 1 failed, 1 passed in 0.9s ===\n",
      "1 failed, 1 passed in 0.9s",
    ),
    ("\nno tests ran in 0.01s\n", "no tests ran in 0.01s"),
    ("Traceback (most recent call last):\nImportError: x\n", "ImportError: x"),
  ],
)
def test_gpu_check_reads_pytests_closing_line(output, want):
  assert gpu._summary(output) == want


@pytest.mark.slow  # runs a benchmark (up to 25 s)
def test_gpu_smoke_runs_tests_step_time_and_copy_probe(tmp_path, capsys):
  output = tmp_path / "gpu.md"
  result = gpu.main(["--smoke", "--tests", "test_schedules", "--output", str(output)])
  (tests,) = result["tests"]  # the multi-device group has nothing to run
  assert tests["status"] == "passed" and tests["modules"] == ["test_schedules"]
  assert re.fullmatch(r"\d+ passed.*", tests["summary"]), tests["summary"]
  # Without torch its rows stay in the table, as not measured.
  measured = [row for row in result["steps"] if row["seconds"] is not None]
  peers = {row["peer"] for row in measured}
  expected = {"gax", "optax chain", "hand-fused", "probe"}
  assert peers == expected | ({"torch foreach", "torch for-loop"} if HAS_TORCH else set())
  assert {(row["params"], row["leaves"]) for row in measured} == {(10_000, 1), (10_000, 10)}
  assert all(_positive(row["seconds"]) for row in measured)
  assert set(result["copy"]) == {"jax -x"} | ({"torch copy_"} if HAS_TORCH else set())
  assert all(_positive(gbps) for gbps in result["copy"].values())
  text = output.read_text()
  assert text.strip() == result["table"] and text.strip() in capsys.readouterr().out
  assert "| step 1e+04 params, 10 leaves |" in text and "| copy probe |" in text


def test_gpu_refuses_to_run_without_a_gpu():
  with pytest.raises(SystemExit, match=r"no GPU.*--allow-cpu"):
    gpu.main(["--tests", "none"])


def _wrong_peers(config):
  """Plausible mistakes in a peer: descending, a 1% wrong rate, eps in the sqrt."""
  right = _common.optax_chain(config)
  return {
    "descends": optax.chain(right, optax.scale(-1.0)),
    "rate 1% off": optax.chain(right, optax.scale(1.01)),
    "eps inside sqrt": optax.chain(
      optax.scale(-1.0),
      optax.scale_by_rms(decay=config.beta, eps=config.eps, eps_in_sqrt=True),
      optax.trace(decay=config.momentum, nesterov=config.nesterov),
      optax.scale_by_learning_rate(config.schedule),
    ),
  }


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("config", list(_common.CONFIGS.values()), ids=list(_common.CONFIGS))
def test_check_before_timing_accepts_right_and_rejects_wrong_peers(config):
  grads = [jax.random.normal(jax.random.key(2), (50,), jnp.float32)]

  def runners(txs):
    return {name: _common.optax_runner(tx, 50, 1, grads) for name, tx in txs.items()}

  right = {"optax chain": _common.optax_chain(config), "gax": _common.gradient_ascent(config)}
  _common.check_runners(runners(right), config, grads, dict.fromkeys(right, 1e-5))
  for name, runner in runners(_wrong_peers(config)).items():
    with pytest.raises(_common.PeerMismatchError, match=name):
      _common.check_runners({name: runner}, config, grads, {name: 1e-5})
  # A peer that only has to ascend still must not descend.
  descends = runners({"descends": _wrong_peers(config)["descends"]})
  with pytest.raises(_common.PeerMismatchError, match="does not ascend"):
    _common.check_runners(descends, config, grads, {"descends": None})


def test_smoke_keeps_the_flags_given_and_memory_takes_no_repeats():
  # --smoke sets the small sizes only where no flag set them (it overrode them all).
  parser = _common.base_parser("x")
  parser.add_argument("--cases", default="1e6:1")
  parser.add_argument("--scan-steps", type=int, default=100)
  args = parser.parse_args(["--smoke", "--cases", ""])
  _common.smoke_defaults(parser, args, cases="1e4:1", scan_steps=20)
  assert (args.cases, args.scan_steps) == ("", 20)
  with pytest.raises(SystemExit):  # memory times nothing: no --repeats to ignore
    memory.main(["--smoke", "--repeats", "3"])


def test_step_time_targets_without_the_probe_show_n_a(capsys):
  # The probe left out of the peers emptied the targets table.
  step_time.main(
    ["--peers", "gax,optax chain", "--sizes", "1e3", "--split", "", "--repeats", "1"]
    + ["--min-sample-ms", "1", "--configs", "default"]
  )
  targets = capsys.readouterr().out.split("### Targets")[1]
  assert re.search(
    r"^\| default \| 1e\+03 \| 1 \| [0-9.]+x \| n/a \| n/a \| n/a \|$", targets, re.M
  )
