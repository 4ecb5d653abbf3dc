"""audio.analysis on synthetic audio of known tempo, metre and key."""

from __future__ import annotations

import numpy as np
import pytest

from audio.analysis import (
    NoSteadyBeat,
    analyze,
    bar_span,
    beat_holds,
    beat_span,
    grid_position,
    loop_span,
)

SR = 32000


def clicks(bpm: float, per_bar: int, seconds: float = 20.0, offset: float = 0.5,
           under: np.ndarray | None = None) -> np.ndarray:
    """A click track: every beat a decaying sine, the first of each bar higher and louder."""
    y = np.zeros(int(seconds * SR), np.float32) if under is None else under.copy()
    t = np.arange(int(0.03 * SR)) / SR
    for i, s in enumerate(np.arange(offset, seconds - 0.1, 60 / bpm)):
        down = i % per_bar == 0
        c = (0.9 if down else 0.4) * np.sin(2 * np.pi * (1500 if down else 1000) * t) \
            * np.exp(-t / 0.008)
        a = int(s * SR)
        y[a:a + len(c)] += c[: len(y) - a]
    return y


def chords(names: list[list[int]], seconds_each: float = 2.0) -> np.ndarray:
    """Triads of sine tones (MIDI notes), one after the other."""
    out = []
    t = np.arange(int(seconds_each * SR)) / SR
    for notes in names:
        x = sum(np.sin(2 * np.pi * 440 * 2 ** ((n - 69) / 12) * t) for n in notes)
        out.append(0.2 * x * np.minimum(1, 20 * t))
    return np.concatenate(out).astype(np.float32)


@pytest.mark.parametrize("bpm, per_bar", [(120, 4), (120, 3), (97, 4), (143, 4), (160, 4)])
def test_click_tracks_give_their_tempo_beats_and_downbeats(bpm, per_bar):
    a = analyze(clicks(bpm, per_bar), SR)
    assert abs(a.tempo - bpm) / bpm < 0.01
    assert a.beats_per_bar == per_bar and a.time_signature == f"{per_bar}/4"
    accents = 0.5 + np.arange(0, 19.5, per_bar * 60 / bpm)
    # every downbeat found is an accent (within 20 ms), and every accent inside was found
    assert all(np.min(np.abs(accents - d)) < 0.02 for d in a.downbeats)
    assert len(a.downbeats) >= len(accents) - 1
    assert all(np.min(np.abs(0.5 + np.arange(0, 19.5, 60 / bpm) - b)) < 0.02 for b in a.beats)


def test_no_steady_beat_says_so():
    for y in (np.random.default_rng(0).standard_normal(20 * SR).astype(np.float32) * 0.1,
              np.zeros(10 * SR, np.float32), np.sin(np.arange(20 * SR) / SR * 1382.3),
              clicks(120, 4, seconds=1.5)):
        with pytest.raises(NoSteadyBeat, match="no steady beat"):
            analyze(np.asarray(y, np.float32), SR)


def test_key_of_a_cadence():
    c_major = [[60, 64, 67], [65, 69, 72], [67, 71, 74], [60, 64, 67]] * 2   # I IV V I
    a_minor = [[57, 60, 64], [62, 65, 69], [64, 68, 71], [57, 60, 64]] * 2   # i iv V i
    for progression, key in ((c_major, "C major"), (a_minor, "A minor")):
        y = clicks(120, 4, seconds=16, under=chords(progression))
        a = analyze(y, SR)
        assert a.key == key and a.key_strength > 0.5


def test_bars_and_beats_map_to_seconds_and_back():
    a = analyze(clicks(120, 4), SR)                 # bars of 2 s from 0.5 s
    s, e = bar_span(a, 2, 2)
    assert abs(s - 2.5) < 0.02 and abs(e - 6.5) < 0.02
    s, e = beat_span(a, 3, 2)
    assert abs(s - 1.5) < 0.02 and abs(e - 2.5) < 0.02
    assert grid_position(a, 2.5) == {"bar": 2, "beat": 1.0}
    assert grid_position(a, 3.25)["bar"] == 2 and abs(grid_position(a, 3.25)["beat"] - 2.5) < 0.05
    far = grid_position(a, 40.5)                    # past the end: the tempo's extrapolation
    assert far["bar"] == 21 and abs(far["beat"] - 1) < 0.05
    with pytest.raises(ValueError, match="past the input"):
        bar_span(a, 9, 2)
    with pytest.raises(ValueError, match="numbered from 1"):
        bar_span(a, 0, 1)
    start, end = loop_span(a, 8, 6.144, 6.144)
    assert abs(start - 0.5) < 0.02 and abs(end - start - (16 - 6.144)) < 0.02
    with pytest.raises(ValueError, match="at least 7 bars"):
        loop_span(a, 6, 6.144, 6.144)
    with pytest.raises(ValueError, match="at most 12 bars"):
        loop_span(a, 13, 6.144, 6.144)
    holds = beat_holds(a, 4.0, 6.0)
    assert len(holds) == 5 and all(h[0] < h[1] for h in holds)   # 6.0 s: its lead-in
    payload = a.to_json()
    assert payload["time_signature"] == "4/4" and payload["bars"] == len(a.downbeats)
