"""The Performance table's arithmetic (tests/bench_perf.py): which epoch counts as reaching an
accuracy, and how a result of an older checkout lines up beside this one's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_perf  # a script beside the tests, not a package

MACHINE = {"cpus": 2, "cpu_capability": "AVX512", "native_bf16": True, "torch": "2.14.1",
           "load_avg_1min": 0.5}


def spread(*values):
    return bench_perf.spread(list(values))


def test_only_whole_test_set_evaluations_count_and_old_rows_are_all_whole():
    sampled = [{"time": 10.0, "test_acc": 0.99, "eval_images": 500},
               {"time": 20.0, "test_acc": 0.96, "eval_images": 3000},
               {"time": 30.0, "test_acc": 0.98, "eval_images": 3000}]
    assert bench_perf._first_reaching(sampled, 5.0, 0.95) == 15.0  # not the 500-image sample
    assert bench_perf._first_reaching(sampled, 5.0, 0.97) == 25.0
    assert bench_perf._first_reaching(sampled, 5.0, 0.99) is None
    old = [{"time": 10.0, "test_acc": 0.95}, {"time": 20.0, "test_acc": 0.97}]
    assert bench_perf._first_reaching(old, 0.0, 0.97) == 20.0


def test_compare_lines_figures_up_by_key_and_marks_what_one_side_lacks():
    before = {"machine": {**MACHINE, "commit": "1553601"},
              "train": {"wall_s": None, "ended_unfinished_s": spread(88.0, 90.0, 100.0),
                        "final_test_acc": spread(0.98), "to_95_s": spread(60.0),
                        "to_97_s": None, "preset": None, "epochs": 200, "train_images": None},
              "startup": {"engine_models_s": spread(2.4, 2.5, 2.6)},
              "app": [{"home_complete_s": 4.4, "explorer_cold_s": 1.5, "explorer_warm_s": 0.7,
                       "xi_slider_to_overlay_ms": {"median": 148, "p90": 229}}]}
    after = {"machine": {**MACHINE, "commit": "abc1234"},
             "train": {"wall_s": spread(14.6), "ended_unfinished_s": None,
                       "final_test_acc": spread(0.9787), "to_95_s": spread(13.9),
                       "to_97_s": spread(13.9), "preset": "live", "epochs": 2,
                       "train_images": 12000},
             "startup": {"engine_models_s": spread(0.08, 0.09, 0.09)},
             "app": [{"home_complete_s": 2.3, "explorer_cold_s": 2.3, "explorer_warm_s": 0.6,
                      "server_rss_mib_after_explorer": 660.0,
                      "xi_slider_to_overlay_ms": {"median": 79, "p90": 110}}]}
    lines = bench_perf.compare(before, after).splitlines()
    assert lines[0] == "| Figure | before (1553601) | after (abc1234) |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    row = {figure: values for figure, *values in cells}
    assert row["Default digits run: process start to finished"] == [
        "ended unfinished after 88.0 / 90.0 / 100.0 s (no preset: 200 epochs, all train images)",
        "14.6 / 14.6 / 14.6 s (live: 2 epochs, 12000 train images)"]
    assert row["... >= 97 %"] == ["not reached", "13.9 / 13.9 / 13.9 s"]
    assert row["`python -m engine models`"] == ["2.40 / 2.50 / 2.60 s", "0.08 / 0.09 / 0.09 s"]
    # The memory figure only the newer bench measures: a dash for the older checkout.
    assert row["App server memory (RSS) after Home and two Explorer visits"] == [
        "-", "660 / 660 / 660 MiB"]
    # What a user opening the Explorer at once waits: Home and the first visit together.
    assert row["App: server start to the Explorer's picture (Home, then the Explorer at once)"] \
        == ["5.90 / 5.90 / 5.90 s", "4.60 / 4.60 / 4.60 s"]


def test_a_metrics_line_still_being_written_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"time": 1.0, "test_acc": 0.9}\n{"time": 2.0, "te')
    assert bench_perf._metrics(tmp_path) == [{"time": 1.0, "test_acc": 0.9}]
    assert bench_perf._metrics(tmp_path / "not-yet") == []


def test_the_table_is_written_between_the_markers_and_nothing_else_changes(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Perf\n\nbefore\n{bench_perf.START}\nold table\n{bench_perf.END}\nafter\n")
    bench_perf.write_table("| new |", doc)
    start, end = bench_perf.START, bench_perf.END
    assert doc.read_text() == f"# Perf\n\nbefore\n{start}\n| new |\n{end}\nafter\n"
    assert bench_perf.PERF_DOC == bench_perf.ROOT / "docs" / "performance.md"
