"""Musical time of a recording: tempo, beats, downbeats, a time-signature guess and a key.

    a = analyze(audio, 32000)          # Analysis; NoSteadyBeat when there is no beat to follow
    a.tempo, a.beats, a.downbeats, a.beats_per_bar, a.key

Offline and on the CPU, with nothing downloaded: librosa's dynamic-programming beat tracker
(Ellis 2007) on a log-mel onset envelope, chosen over the learned trackers by what installs and
runs here (docs/server.md, "Musical time"). On top of the beats, this module adds what librosa
does not: the tempo as the slope of a line fitted through the beats (not the tempogram's lag
grid, which is 0.3 % off at 128 BPM at a 10 ms hop), a steadiness check, the bar (3 or 4 beats)
and its phase from accents at the beats, and a Krumhansl-Kessler key estimate.

Downbeats: every beat gets an accent, the sum of three z-scored cues that mark the start of a
bar in most music: the onset strength at the beat, the low-band (< 250 Hz, kick and bass) onset
strength, and how much the harmony (chroma) changes there. The (beats per bar, phase) whose
beats are most accented wins; 4 beats unless 3 is clearly better, since a 4/4 piece whose
accents fall on 1 and 3 scores for 3 too only by chance.

Bars are numbered from 1 as in a score: bar 1 begins at the first downbeat found (beats before
it are a pickup). Beats are numbered from 1 too. The grid past the last beat is the tempo's
extrapolation (`grid_position`), which is what a continuation that keeps the tempo would follow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

HOP_SECONDS = 0.01           # the onset envelope's frame (100 Hz): beat times are this precise
NFFT = 2048                  # onset window (64 ms): 32 ms windows track clicks in pink noise worse
ONSET_LAG = 0.01             # the envelope's peak trails an attack by a frame (click tracks)
MIN_BEATS = 8                # fewer beats than this is no grid to edit on (4 s at 120 BPM)
MIN_PULSE = 0.25             # the onset envelope's autocorrelation at the beat period; noise
                             # scores < 0.1, click tracks ~0.9, the corpus's music 0.3-0.8
MIN_ONSET = 0.3              # the onset envelope's 99th percentile (dB rise per frame, mean over
                             # mel bands): a held sine ~0.04, noise ~0.7, clicks and music > 2
MAX_JITTER = 0.08            # median deviation of the beat-to-beat intervals, in beats
HALF_TEMPO = 0.8             # halfway onsets this strong against the beats': twice the tempo
THREE_OVER_FOUR = 1.25       # how much more accented 3-beat bars must be to beat 4

_NOTES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Krumhansl & Kessler (1982) probe-tone profiles, tonic first.
_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


class NoSteadyBeat(ValueError):
    """The audio has no steady beat to count bars on (silence, noise, free time, too short)."""


@dataclass
class Analysis:
    duration: float              # seconds
    tempo: float                 # beats per minute, from the beats' fitted period
    beats: list[float]           # seconds
    downbeats: list[float]       # seconds: the beats that start a bar
    beats_per_bar: int           # 3 or 4
    first_downbeat: int          # index into beats of the first downbeat
    key: str                     # e.g. "A minor"
    key_strength: float          # correlation of the chroma with the key's profile, -1..1
    pulse: float                 # 0..1: how clearly the beat stands out of the onsets

    @property
    def period(self) -> float:
        """Seconds per beat."""
        return 60.0 / self.tempo

    @property
    def time_signature(self) -> str:
        return f"{self.beats_per_bar}/4"

    def to_json(self) -> dict:
        d = asdict(self)
        d["time_signature"] = self.time_signature
        d["bars"] = len(self.downbeats)
        for k in ("tempo", "key_strength", "pulse", "duration"):
            d[k] = round(d[k], 3)
        for k in ("beats", "downbeats"):
            d[k] = [round(t, 4) for t in d[k]]
        return d


def analyze(audio: np.ndarray, rate: int) -> Analysis:
    """Tempo, beats, bars and key of mono float audio at `rate`. NoSteadyBeat says why not."""
    import librosa  # slow to import (numba); only analysis needs it

    y = np.asarray(audio, dtype=np.float32)
    duration = len(y) / rate
    hop = round(rate * HOP_SECONDS)
    if not np.any(y):
        raise NoSteadyBeat("no steady beat: the audio is silent")
    if duration < 2.0:
        raise NoSteadyBeat(f"no steady beat: {duration:.2f} s of audio is too little to find one "
                           "(send at least a few bars)")
    # Onsets from a 64 ms window, chroma from a 128 ms one (7.8 Hz bins: semitones apart down
    # to ~130 Hz) at 4 onset frames a frame: harmony moves slower than attacks.
    mel = librosa.power_to_db(_per_block(y, NFFT, hop, lambda s: librosa.feature.melspectrogram(
        S=s, sr=rate, n_mels=64)))                                               # (64, T)
    onset = librosa.onset.onset_strength(S=mel, sr=rate, hop_length=hop, n_fft=NFFT)  # (T,)
    low = librosa.onset.onset_strength(S=mel[:5], sr=rate, hop_length=hop, n_fft=NFFT)  # <250 Hz
    tuning = librosa.estimate_tuning(y=y[: 60 * rate], sr=rate)
    chroma = _per_block(y, 4096, 4 * hop, lambda s: librosa.feature.chroma_stft(
        S=s, sr=rate, n_fft=4096, tuning=tuning))                                # (12, T / 4)
    key, key_strength = _key(chroma)

    if np.percentile(onset, 99) < MIN_ONSET:
        raise NoSteadyBeat("no steady beat: hardly anything in the audio starts (a held tone, a "
                           "drone); edit in seconds instead")
    # The tempo from at most the middle minute: librosa's tempogram over a 10-minute upload
    # takes 2 GB; the beat tracker itself then follows the whole piece.
    mid, half = len(onset) // 2, round(30 / HOP_SECONDS)
    bpm = float(librosa.feature.tempo(onset_envelope=onset[max(0, mid - half): mid + half],
                                      sr=rate, hop_length=hop)[0])
    _, frames = librosa.beat.beat_track(onset_envelope=onset, sr=rate, hop_length=hop,
                                        trim=True, bpm=bpm)
    frames = _trim_weak_ends(np.asarray(frames, dtype=int), onset)
    if len(frames) >= MIN_BEATS and _half_tempo(frames, onset):
        _, frames = librosa.beat.beat_track(onset_envelope=onset, sr=rate, hop_length=hop,
                                            trim=True, bpm=2 * 60 / (np.median(np.diff(frames))
                                                                     * HOP_SECONDS))
        frames = _trim_weak_ends(np.asarray(frames, dtype=int), onset)
    if len(frames) < MIN_BEATS:
        raise NoSteadyBeat(f"no steady beat: only {len(frames)} beats found in {duration:.1f} s "
                           f"(at least {MIN_BEATS} are needed to count bars)")
    beats = np.maximum(0.0, _refine(frames, onset) * hop / rate - ONSET_LAG)  # seconds
    period = float(np.polyfit(np.arange(len(beats)), beats, 1)[0])
    ibi = np.diff(beats)
    jitter = float(np.median(np.abs(ibi - np.median(ibi))) / np.median(ibi))
    pulse = _pulse(onset, period / HOP_SECONDS)
    if pulse < MIN_PULSE or jitter > MAX_JITTER:
        raise NoSteadyBeat(
            f"no steady beat: the onsets repeat weakly at the best period ({60 / period:.1f} BPM "
            f"pulse {pulse:.2f}, needs {MIN_PULSE}) or the beats wander ({jitter:.2f} of a beat, "
            f"at most {MAX_JITTER}); edit in seconds instead")

    change = _harmony_change(chroma, frames // 4, 4096 // 8 // hop)
    accent = _z(_at(onset, frames)) + _z(_at(low, frames)) + _z(change)
    per_bar, phase = _metre(accent)
    return Analysis(
        duration=duration, tempo=float(60.0 / period), beats=[float(t) for t in beats],
        downbeats=[float(t) for t in beats[phase::per_bar]], beats_per_bar=per_bar,
        first_downbeat=phase, key=key, key_strength=key_strength, pulse=pulse)


def warmup(rate: int) -> None:
    """Pay librosa's import and its kernels' first compile (seconds) before the first request:
    analyse 6 s of clicks at 120 BPM."""
    y = np.zeros(6 * rate, np.float32)
    click = np.sin(2 * np.pi * 1000 * np.arange(rate // 50) / rate).astype(np.float32)
    for i in range(12):
        y[i * rate // 2: i * rate // 2 + len(click)] += click
    analyze(y, rate)


def _per_block(y: np.ndarray, n_fft: int, hop: int, features, block: int = 2048) -> np.ndarray:
    """features(|STFT|^2) for librosa.stft's frames (centred, zero-padded), computed `block`
    frames at a time and joined on the time axis: a 10-minute upload never holds its whole
    spectrogram (1.5 GB as complex64 and its powers), only the features (~16 MB)."""
    import librosa

    padded = np.pad(y, n_fft // 2)
    n_frames = 1 + len(y) // hop
    out = []
    for f0 in range(0, n_frames, block):
        f1 = min(n_frames, f0 + block)
        seg = padded[f0 * hop: (f1 - 1) * hop + n_fft]
        out.append(features(np.abs(librosa.stft(seg, n_fft=n_fft, hop_length=hop,
                                                center=False)) ** 2))
    return np.concatenate(out, axis=-1)


def _trim_weak_ends(frames: np.ndarray, onset: np.ndarray) -> np.ndarray:
    """Without the beats at either end that fall on no onset (the tracker runs on past the
    music's first and last beats at its tempo)."""
    strength = _at(onset, frames)
    strong = np.flatnonzero(strength >= 0.5 * np.median(strength)) if len(frames) else []
    return frames[strong[0]: strong[-1] + 1] if len(strong) else frames


def _half_tempo(frames: np.ndarray, onset: np.ndarray) -> bool:
    """The tracker's octave error: beats under 100 BPM with onsets as strong halfway between
    them as on them (a 160 BPM click track tracked at 80). Music at 90 BPM with eighth notes
    has weaker onsets between its beats than on them and keeps its tempo."""
    ibi = np.median(np.diff(frames)) * HOP_SECONDS
    if 60 / ibi >= 100:
        return False
    mids = ((frames[:-1] + frames[1:]) // 2).astype(int)
    return bool(np.median(_at(onset, mids)) >= HALF_TEMPO * np.median(_at(onset, frames)))


def _refine(frames: np.ndarray, onset: np.ndarray, reach: int = 2) -> np.ndarray:
    """Beat positions in fractional frames: each moved to the onset peak within `reach` frames,
    refined between frames by a parabola through the peak and its neighbours."""
    out = frames.astype(float)
    for i, f in enumerate(frames):
        lo = max(1, f - reach)
        hi = min(len(onset) - 1, f + reach + 1)
        if hi <= lo:
            continue
        p = lo + int(np.argmax(onset[lo:hi]))
        if p + 1 >= len(onset):
            continue
        a, b, c = onset[p - 1], onset[p], onset[p + 1]
        den = a - 2 * b + c
        out[i] = p + (0.5 * (a - c) / den if den < 0 else 0.0)
    return out


def _z(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / s if s > 1e-9 else np.zeros_like(x)


def _at(env: np.ndarray, frames: np.ndarray, reach: int = 2) -> np.ndarray:
    """The envelope summed within `reach` frames of each beat: an attack's flux splits between
    two frames by where it falls inside them, so a single frame's peak varies by 30 %."""
    return np.array([env[max(0, f - reach): f + reach + 1].sum() for f in frames])


def _harmony_change(chroma: np.ndarray, frames: np.ndarray, half: int) -> np.ndarray:
    """Per beat, 1 - cosine between the chroma of the beat before it and the beat it starts.
    A beat's chroma is the mean of the frames whose window (2 `half` frames wide) lies inside it,
    so neither neighbour's attack leaks in."""
    edges = np.concatenate([frames, [chroma.shape[1]]])

    def inside(a: int, b: int) -> np.ndarray:
        lo, hi = (a + half, b - half) if b - a > 2 * half else (a, max(b, a + 1))
        return chroma[:, lo:hi].mean(1)

    seg = np.stack([inside(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)])
    seg /= np.linalg.norm(seg, axis=1, keepdims=True) + 1e-9
    change = np.zeros(len(frames))
    change[1:] = 1 - (seg[1:] * seg[:-1]).sum(1)
    return change


def _metre(accent: np.ndarray) -> tuple[int, int]:
    """(beats per bar, index of the first downbeat) whose beats are the most accented."""
    best = {}
    for m in (3, 4):
        scores = [accent[p::m].mean() - accent.mean() for p in range(m)]
        p = int(np.argmax(scores))
        best[m] = (scores[p], p)
    if best[3][0] > THREE_OVER_FOUR * max(best[4][0], 1e-9) and len(accent) >= 6:
        return 3, best[3][1]
    return 4, best[4][1]


def _pulse(onset: np.ndarray, lag: float) -> float:
    """Normalised autocorrelation of the onset envelope at the beat period (0..1), after its
    slow trend (a 1 s moving average) is removed: a swelling pad's envelope correlates with
    itself at every short lag without any beat."""
    box = np.ones(101) / 101
    x = onset - np.convolve(np.pad(onset, 50, mode="edge"), box, mode="valid")
    denom = float((x * x).sum())
    if denom <= 0:
        return 0.0
    lo, hi = int(np.floor(lag)), int(np.ceil(lag))
    if hi >= len(x) or lo < 1:
        return 0.0
    ac = [float((x[:-k] * x[k:]).sum()) / denom for k in range(max(1, lo - 1), hi + 2)]
    return max(0.0, max(ac))


def _key(chroma: np.ndarray) -> tuple[str, float]:
    """Krumhansl-Schmuckler: the major or minor key whose rotated profile best correlates with
    the piece's mean chroma."""
    mean = chroma.mean(1)
    if not np.any(mean > 0):
        return "unknown", 0.0
    best = ("unknown", -1.0)
    for mode, prof in (("major", _MAJOR), ("minor", _MINOR)):
        for tonic in range(12):
            r = float(np.corrcoef(mean, np.roll(prof, tonic))[0, 1])
            if r > best[1]:
                best = (f"{_NOTES[tonic]} {mode}", r)
    return best[0], round(best[1], 3)


# --- bars and beats -> seconds, and back ---------------------------------------------------


def grid_time(a: Analysis, beat: float) -> float:
    """The time of beat number `beat` (0-based, fractional), on the tracked beats inside the
    piece and on the tempo's extrapolation outside them."""
    b = a.beats
    if beat < 0:
        return b[0] + beat * a.period
    if beat >= len(b) - 1:
        return b[-1] + (beat - (len(b) - 1)) * a.period
    i = int(beat)
    return b[i] + (beat - i) * (b[i + 1] - b[i])


def bar_span(a: Analysis, start_bar: int, bars: int) -> tuple[float, float]:
    """Seconds [start, end) of `bars` bars from bar `start_bar` (1 = the first downbeat's)."""
    n_bars = len(a.downbeats)
    if start_bar < 1 or bars < 1:
        raise ValueError(f"bars are numbered from 1 and a span has at least 1 bar "
                         f"(start_bar {start_bar}, bars {bars})")
    first = a.first_downbeat + (start_bar - 1) * a.beats_per_bar
    start, end = grid_time(a, first), grid_time(a, first + bars * a.beats_per_bar)
    if start >= a.duration or end > a.duration + 0.5 * a.period:
        raise ValueError(
            f"bars {start_bar} to {start_bar + bars - 1} end at {end:.2f} s, past the input's "
            f"{a.duration:.2f} s ({n_bars} bars found at {a.tempo:.1f} BPM, "
            f"{a.time_signature})")
    return start, min(end, a.duration)


def beat_span(a: Analysis, start_beat: int, beats: int) -> tuple[float, float]:
    """Seconds [start, end) of `beats` beats from beat `start_beat` (1 = the first beat)."""
    if start_beat < 1 or beats < 1:
        raise ValueError(f"beats are numbered from 1 and a span has at least 1 beat "
                         f"(start_beat {start_beat}, beats {beats})")
    start, end = grid_time(a, start_beat - 1), grid_time(a, start_beat - 1 + beats)
    if start >= a.duration or end > a.duration + 0.5 * a.period:
        raise ValueError(f"beats {start_beat} to {start_beat + beats - 1} end at {end:.2f} s, "
                         f"past the input's {a.duration:.2f} s ({len(a.beats)} beats found)")
    return start, min(end, a.duration)


def grid_position(a: Analysis, t: float) -> dict:
    """Where second `t` falls on the bar grid: {"bar": 1-based, "beat": 1-based, fractional}.
    Past the last beat the grid continues at the tempo."""
    b = np.asarray(a.beats)
    if t <= b[0]:
        beat = (t - b[0]) / a.period
    elif t >= b[-1]:
        beat = len(b) - 1 + (t - b[-1]) / a.period
    else:
        i = int(np.searchsorted(b, t, side="right") - 1)
        beat = i + (t - b[i]) / (b[i + 1] - b[i])
    rel = round(float(beat) - a.first_downbeat, 2)      # a hundredth of a beat: on the beat
    bar = int(np.floor(rel / a.beats_per_bar))
    return {"bar": bar + 1, "beat": round(rel - bar * a.beats_per_bar + 1, 2)}


def loop_span(a: Analysis, bars: int, tail: float, least: float = 0.0) -> tuple[float, float]:
    """Seconds [start, end) of the input a loop of `bars` bars keeps: from the first downbeat,
    `bars` bars less `tail` seconds (the generated bridge that leads back into the start), at
    least `least` seconds of it. ValueError says how many bars fit."""
    start = grid_time(a, a.first_downbeat)
    bar = a.beats_per_bar * a.period                       # seconds, for the messages
    fewest = int(np.ceil((tail + least) / bar - 1e-6))
    most = int(np.floor((a.duration - start + tail) / bar + 1e-6))
    where = (f"at {a.tempo:.1f} BPM in {a.time_signature} a bar is {bar:.2f} s, and the loop "
             f"keeps the input from its first downbeat ({start:.2f} s) and adds a "
             f"{tail:g} s bridge")
    if bars < fewest:
        raise ValueError(f"{bars} bars is too short a loop: {where}, keeping at least "
                         f"{least:g} s; ask for at least {fewest} bars")
    length = grid_time(a, a.first_downbeat + bars * a.beats_per_bar) - start
    if bars > most or start + length - tail > a.duration:
        raise ValueError(f"{bars} bars is more than the input holds: {where}; ask for at most "
                         f"{most} bars")
    return start, start + length - tail


def beat_holds(a: Analysis, t0: float, t1: float, before: float = 0.024,
               after: float = 0.072) -> list[tuple[float, float]]:
    """The windows around each beat inside [t0, t1): the attack and the first of its decay."""
    return [(max(t0, t - before), min(t1, t + after)) for t in a.beats
            if t0 <= t + after and t - before < t1]
