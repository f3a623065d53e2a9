"""One unit (milliseconds) and one layout for timings: stages, their parts indented, the total."""

from varedit_deploy.timings import format_timings, per_scale, timing_rows

EDIT_MS = {"text_encoder": 1.5, "vae_encoder": 20.0, "transformer": 100.0, "vae_decoder": 30.0,
           "text_condition": 1.0, "source_pass": 9.0, "step": 70.0, "sample": 5.0, "next_input": 10.0,
           "scale_1": 40.0, "scale_0": 45.0, "total": 151.5}


def test_parts_follow_their_stage_and_the_total_comes_last():
    rows = timing_rows(EDIT_MS)
    assert [key for key, _, _ in rows] == ["text_encoder", "vae_encoder", "transformer", "text_condition",
                                           "source_pass", "step", "sample", "next_input", "vae_decoder", "total"]
    assert {key: parent for key, _, parent in rows}["step"] == "transformer"
    assert per_scale(EDIT_MS) == [45.0, 40.0]


def test_the_table_says_its_unit_and_indents_the_parts():
    lines = format_timings(EDIT_MS).splitlines()
    assert lines[0].split() == ["stage", "ms"]
    assert lines[3].startswith("transformer") and lines[4].startswith("  text_condition")
    assert lines[6].startswith("  step (all scales)") and lines[6].split()[-1] == "70.0"
    assert lines[9].startswith("vae_decoder") and lines[10].split() == ["total", "151.5"]
    assert "parts of the stage above" in lines[11] and lines[12].endswith("45.0 40.0")
