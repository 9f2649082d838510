"""Training telemetry: FLOPs from XLA's cost analysis against closed forms, the MFU and
throughput arithmetic, and a real run's TensorBoard events, console line and trace."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ldm_jax.errors import UserError
from ldm_jax.training import curves, telemetry


def test_step_flops_of_a_matmul_is_2mnk_per_device():
    """XLA's count for [m, k] @ [k, n] is 2mnk; split over 8 devices by rows, each device's
    program does an eighth of it."""
    m, k, n = 64, 48, 40
    f = jax.jit(lambda a, b: a @ b)
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    f(a, b)
    assert telemetry.step_flops(f, a, b) == 2 * m * n * k
    mesh = jax.make_mesh((8,), ("data",))
    rows = jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))
    assert telemetry.step_flops(f, rows, b) == 2 * m * n * k / 8


def test_peak_table_and_override():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert telemetry.peak_flops(Device("TPU v5 lite")) == 197e12
    assert telemetry.peak_flops(Device("TPU v5")) == 459e12
    assert telemetry.peak_flops(Device("NVIDIA H100 PCIe")) == 756e12
    assert telemetry.peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert telemetry.peak_flops(Device("cpu")) is None
    assert telemetry.peak_flops(Device("cpu"), 2e11) == 2e11


def test_interval_figures_from_known_times(monkeypatch):
    """Steps of 0.25 s with 0.05 s of input each, batch 32 on 8 devices, 1e10 FLOPs per
    device and step against a 1e11 peak: 128 images/s, 16 per device, MFU 0.4; the paused
    time (an evaluation) is not step time."""
    now = [100.0]
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: now[0])
    clock = telemetry.StepTelemetry(batch_size=32, peak_flops_override=1e11)
    clock.num_devices, clock.flops = 8, 1e10
    clock.started()
    for i in range(4):
        clock.input_started()
        now[0] += 0.05
        clock.input_done()
        now[0] += 0.20
        clock.step_done()
        if i == 1:
            clock.pause(None)
            now[0] += 7.0  # an evaluation between steps
            clock.resume()
    got = clock.interval()
    np.testing.assert_allclose(got["step_ms"], 250.0)
    np.testing.assert_allclose(got["images_per_sec"], 128.0)
    np.testing.assert_allclose(got["images_per_sec_per_device"], 16.0)
    np.testing.assert_allclose([got["input_ms"], got["input_share"]], [50.0, 0.2])
    np.testing.assert_allclose([got["mfu"], got["tflops_per_device"]], [0.4, 0.04])
    assert clock.interval() == {}  # nothing since


def test_profile_steps_must_be_a_range(tmp_path):
    for bad in [(3,), (0, 2), (5, 4), (1, 2, 3)]:
        with pytest.raises(UserError, match="profile_steps"):
            telemetry.Profiler(tmp_path, bad)
    assert not telemetry.Profiler(tmp_path, ()).active


def test_a_run_logs_its_throughput_and_traces_its_steps(tiny_autoencoder_run):
    """The resumed tiny run (steps 3-4, profile_steps=(3, 4), peak 1e11): step time,
    images/s, input time, TFLOP/s and MFU at step 4 in metrics.jsonl and TensorBoard, one
    console line, and a jax.profiler trace under profile/process_0."""
    from tensorboardX.proto import event_pb2

    workdir, _, resumed = tiny_autoencoder_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    perf = next(r for r in rows if r["step"] == 4 and "perf/step_ms" in r)
    assert perf["perf/step_ms"] > 0 and 0 <= perf["perf/input_share"] <= 1
    np.testing.assert_allclose(
        perf["perf/images_per_sec"], 2 / (perf["perf/step_ms"] / 1e3), rtol=1e-6
    )  # batch 2
    np.testing.assert_allclose(perf["perf/mfu"], perf["perf/tflops_per_device"] * 1e12 / 1e11)
    assert 0 < perf["perf/mfu"] < 1
    tags = set()
    for events in (workdir / "tb").glob("events.out.tfevents.*"):
        data = events.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord framing: length, crc, payload, crc
            n = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            tags |= {v.tag for v in event.summary.value}
            pos += 16 + n
    assert {"perf/step_ms", "perf/mfu", "perf/input_share", "perf/images_per_sec"} <= tags
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("throughput: "))
    assert "images/s" in line and "MFU" in line and "input" in line
    # Into a pipe, progress is one plain line per logged step, with no carriage returns.
    last = next(x for x in resumed.stdout.splitlines() if x.startswith("step 4/4: loss="))
    assert "img_s=" in last and "mfu=" in last
    assert "\r" not in resumed.stdout + resumed.stderr
    # Each run ends by drawing its curves; the resumed run's cover steps 1-4.
    result = json.loads((workdir / "metrics.json").read_text())
    assert result["curves_png"] == str(workdir / "curves.png")
    assert curves.read_series(workdir / "metrics.jsonl")["loss"][0].tolist() == [1, 2, 3, 4]
    assert Image.open(workdir / "curves.png").size[0] == 3 * curves.PANEL_W
    traces = list((workdir / "profile" / "process_0").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_in_a_terminal_and_lines_in_a_log(capsys):
    from ldm_jax.training import progress

    figures = {"images_per_sec": 12.5, "mfu": 0.31, "input_share": 0.05}
    terminal = _Terminal()
    bar = progress.Progress(10, 0, lead=True, show=True, stream=terminal)
    bar.update(5, 0.25, figures)
    bar.write("step 5: eval=1")
    bar.close()
    assert "\r" in terminal.getvalue() and "mfu=31.0%" in terminal.getvalue()
    log = io.StringIO()
    lines = progress.Progress(10, 2, lead=True, show=True, stream=log)
    lines.update(4, 0.25, figures)
    lines.update(10, 0.125, figures)
    lines.write("step 10: eval=1")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 4/10: loss=0.25, img_s=12.5, mfu=31.0%, input=5%, ")
    assert (
        out[0].endswith(" left")
        and out[1] == "step 10/10: loss=0.125, img_s=12.5, mfu=31.0%, input=5%"
    )
    assert out[2] == "step 10: eval=1" and log.getvalue() == ""
    hidden = progress.Progress(10, 0, lead=True, show=False, stream=log)
    hidden.update(10, 0.1, figures)
    hidden.write("preemption requested")  # the lead's lines are written without a bar
    other = progress.Progress(10, 0, lead=False, show=True, stream=log)
    other.update(10, 0.1, figures)
    other.write("not process 0")
    assert capsys.readouterr().out == "preemption requested\n"
