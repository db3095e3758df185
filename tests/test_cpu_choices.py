"""cpu_choices: a kernel probe's first decision on a machine is the one every later load gets."""

import json

from conftest import import_module

cpu_choices = import_module("cpu_choices")
weight_formats = import_module("weight_formats")


def test_the_first_decision_is_remembered_and_later_probes_do_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_choices.CACHE_DIR_ENV, str(tmp_path))
    answers = iter([("packed", "probe 1"), ("plain", "probe 2")])
    first = cpu_choices.remembered("fp32_linear", lambda: next(answers))
    again = cpu_choices.remembered("fp32_linear", lambda: next(answers))
    assert first == ("packed", "probe 1")
    assert again[0] == "packed" and "remembered for this CPU" in again[1]
    stored = json.loads(cpu_choices.choices_path().read_text())
    assert stored[cpu_choices.machine_key()]["fp32_linear"] == ["packed", "probe 1"]


def test_another_machine_key_probes_for_itself(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_choices.CACHE_DIR_ENV, str(tmp_path))
    cpu_choices.remembered("fp32_linear", lambda: ("packed", "here"))
    monkeypatch.setattr(cpu_choices, "machine_key", lambda: "Another CPU | torch x | 2 threads")
    assert cpu_choices.remembered("fp32_linear", lambda: ("plain", "there")) == ("plain", "there")


def test_an_unreadable_or_unwritable_store_only_costs_a_probe(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_choices.CACHE_DIR_ENV, str(tmp_path))
    cpu_choices.choices_path().write_text("not json")
    assert cpu_choices.remembered("fp32_linear", lambda: ("plain", "fresh")) == ("plain", "fresh")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(cpu_choices.CACHE_DIR_ENV, str(blocker / "below a file"))
    assert cpu_choices.remembered("fp32_linear", lambda: ("packed", "unstored")) == ("packed", "unstored")


def test_fp32_kernel_choice_is_stable_across_processes_on_one_machine(tmp_path, monkeypatch):
    """Two loads that probe differently still run the kernel the first one chose (the issue's flip)."""
    monkeypatch.setenv(cpu_choices.CACHE_DIR_ENV, str(tmp_path))
    probes = iter([("plain", "F.linear faster"), ("packed", "oneDNN faster")])
    monkeypatch.setattr(weight_formats, "_probe_fp32_linear_kernel", lambda: next(probes))
    chosen = []
    for _ in range(2):
        weight_formats.fp32_linear_kernel.cache_clear()  # as a new process would start
        chosen.append(weight_formats.fp32_linear_kernel()[0])
    weight_formats.fp32_linear_kernel.cache_clear()
    assert chosen == ["plain", "plain"]
