"""Device profiles: shipped profiles, loading errors, probing this machine, the CLI."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from edgeinfer.devices.profiles import (
    DeviceProfile,
    Precisions,
    list_profiles,
    load_profile,
    probe,
    write_profile,
)

from edgeinfer.cli import main
from edgeinfer.errors import DeviceProfileError

SHIPPED = ["jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "laptop-x86-16gb",
           "macbook-m-series-16gb", "raspberry-pi-5-8gb"]
# Measured bandwidth may dip between neighbouring chunk sizes (noise, a shared VM disk):
# each entry must reach at least this fraction of the one before it.
MONOTONE_TOLERANCE = 0.7


def test_shipped_profiles_are_listed():
    # a developer's own probe output (devices/this-machine.toml) may sit beside them
    assert set(SHIPPED) <= set(list_profiles()) and list_profiles() == sorted(list_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_is_sane(name):
    p = load_profile(name)
    assert p.name == name
    assert 1 << 30 <= p.memory_bytes <= 1 << 40
    assert 0.3 * p.memory_bytes <= p.default_memory_budget <= 0.8 * p.memory_bytes
    assert 1 <= p.cores <= 64
    assert 5 <= p.dram_bandwidth_gbps <= 1000
    sizes = [c for c, _ in p.flash_read_gbps]
    gbps = [g for _, g in p.flash_read_gbps]
    assert sizes[0] == 4096 and sizes[-1] == 4 << 20
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert all(b >= a for a, b in zip(gbps, gbps[1:])), "flash curve must not fall"
    assert 0.01 <= gbps[0] < gbps[-1] <= 16
    # flash is far slower than DRAM: the reason this project exists
    assert gbps[-1] < p.dram_bandwidth_gbps / 3
    assert p.execution_providers[-1] == "CPUExecutionProvider"
    assert p.precisions.weights == "int4"
    assert p.sources and any("ESTIMATE" in s for s in p.sources)
    assert any(("http" in s) or ("arXiv" in s) or ("computed" in s) for s in p.sources)


def test_profiles_say_what_they_target():
    assert load_profile("jetson-orin-nano-8gb").execution_providers[0] == \
        "TensorrtExecutionProvider"
    assert load_profile("macbook-m-series-16gb").execution_providers[0] == \
        "CoreMLExecutionProvider"
    assert load_profile("jetson-orin-nano-8gb").dram_bandwidth_gbps == 68.0
    assert load_profile("raspberry-pi-5-8gb").dram_bandwidth_gbps == pytest.approx(
        4267e6 * 4 / 1e9, rel=0.01)


def test_flash_bandwidth_interpolates_log_log():
    p = load_profile("laptop-x86-16gb")
    table = dict(p.flash_read_gbps)
    for chunk, gbps in table.items():
        assert p.flash_bandwidth(chunk) == pytest.approx(gbps)
    mid = p.flash_bandwidth(8192)               # between 4 KiB and 16 KiB, geometric
    assert mid == pytest.approx(math.sqrt(table[4096] * table[16384]))
    assert p.flash_bandwidth(2048) == pytest.approx(table[4096] / 2)   # latency-bound
    assert p.flash_bandwidth(64 << 20) == pytest.approx(table[4 << 20])  # plateau
    with pytest.raises(ValueError):
        p.flash_bandwidth(0)


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(DeviceProfileError) as info:
        load_profile("jetson-nano-2gb")
    msg = str(info.value)
    assert "unknown device profile 'jetson-nano-2gb'" in msg
    for name in SHIPPED:
        assert name in msg
    with pytest.raises(DeviceProfileError, match="does not exist"):
        load_profile("/no/such/profile.toml")


def test_malformed_profiles_are_rejected(tmp_path):
    good = load_profile("raspberry-pi-5-8gb")
    path = write_profile(good, tmp_path / "pi.toml")
    text = path.read_text()
    cases = {
        "unknown field": text.replace("cores = 4", "cores = 4\ncore = 4"),
        "cores must be a positive integer": text.replace("cores = 4", "cores = 0"),
        "exceeds memory_bytes": text.replace("default_memory_budget = 5368709120",
                                             "default_memory_budget = 9968709120"),
        "flash_read_gbps entry 4096": text.replace("4096 = 0.103", "4096 = -1.0"),
        "not valid TOML": text + "\n[[[",
        "missing field": text.replace("cores = 4\n", ""),
        "precisions.weights": text.replace('weights = "int4"', 'weights = "int3"'),
    }
    for expected, body in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        with pytest.raises(DeviceProfileError, match=expected) as info:
            load_profile(bad)
        assert str(bad) in str(info.value)


def test_write_then_load_round_trips(tmp_path):
    for name in SHIPPED:
        p = load_profile(name)
        assert load_profile(write_profile(p, tmp_path / f"{name}.toml")) == p
    odd = dataclasses.replace(
        load_profile("laptop-x86-16gb"), name="odd-one",
        description='quotes " and \\ backslash, tab\t and ünïcode',
        sources=("a \"quoted\" source",), precisions=Precisions("int8", "int4", "bfloat16"),
        flash_read_gbps=((4096, 0.1234567890123), (1 << 20, 2.0)))
    path = write_profile(odd, tmp_path / "sub" / "odd.toml")
    assert load_profile(path) == odd
    assert not list(path.parent.glob("*.partial-tmp"))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    directory = tmp_path_factory.mktemp("probe")
    profile = probe(directory, chunk_sizes=(4096, 65536, 1 << 20), file_size=16 << 20,
                    seconds=0.15, dram_bytes=32 << 20, progress=False)
    assert list(directory.iterdir()) == []          # the test file is gone
    print("probe:", {c: round(g, 3) for c, g in profile.flash_read_gbps},
          f"dram {profile.dram_bandwidth_gbps:.2f} GB/s")
    return profile


def test_probe_measures_this_machine(measured):
    p = measured
    assert isinstance(p, DeviceProfile) and p.name == "this-machine"
    gbps = dict(p.flash_read_gbps)
    assert sorted(gbps) == [4096, 65536, 1 << 20]
    assert all(g > 0 and math.isfinite(g) for g in gbps.values())
    assert gbps[1 << 20] >= gbps[4096]
    values = [gbps[c] for c in sorted(gbps)]
    for small, large in zip(values, values[1:]):
        assert large >= MONOTONE_TOLERANCE * small, values
    assert 0.5 < p.dram_bandwidth_gbps < 2000
    assert p.cores >= 1 and p.memory_bytes > 1 << 28
    assert "CPUExecutionProvider" in p.execution_providers
    assert any(s.startswith("flash: measured") for s in p.sources)


def test_probe_shows_progress_and_rejects_a_missing_dir(tmp_path, capsys):
    probe(tmp_path, chunk_sizes=(4096, 1 << 20), file_size=8 << 20, seconds=0.05,
          dram_bytes=8 << 20, progress=True)
    err = capsys.readouterr().err
    assert "[1/2]    4 KiB:" in err and "[2/2]    1 MiB:" in err and "DRAM" in err
    with pytest.raises(DeviceProfileError, match="does not exist"):
        probe(tmp_path / "missing", progress=False)


def test_probed_profile_round_trips(measured, tmp_path):
    path = write_profile(measured, tmp_path / "this-machine.toml")
    assert load_profile(path) == measured


def test_cli_lists_profiles(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["name", "memory", "budget"]
    assert set(SHIPPED) <= {r.split()[0] for r in rows} and len(rows) == len(list_profiles())
    assert "Tensorrt,CUDA,CPU" in out and "204.8" in out
    assert main(["devices", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in data}
    assert set(SHIPPED) <= set(by_name)
    assert by_name["jetson-agx-orin-64gb"]["flash_read_gbps"]["4096"] == 0.197


def test_cli_probe_quick_writes_a_profile(tmp_path, capsys):
    out = tmp_path / "devices" / "this-machine.toml"
    assert main(["devices", "probe", "--quick", "-o", str(out), "--dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "4 KiB" in captured.out and "1 MiB" in captured.out and "reads/s" in captured.out
    assert f"wrote {out}" in captured.out
    assert "probe: flash reads" in captured.err
    profile = load_profile(out)
    assert profile.name == "this-machine" and len(profile.flash_read_gbps) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgeinfer-probe")]


def test_cli_probe_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["devices", "probe", "--quick", "--dir", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeinfer: error: probe directory") and "\n" not in err
    assert main(["devices", "probe", "--quick", "--threads", "0"]) == 1
    assert "--threads" in capsys.readouterr().err
