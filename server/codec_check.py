"""Which codec serves, and whether it makes the codes the DiT was trained on.

A DiT predicts a codec's tokens: with a codec whose encoder or quantiser differ, its tokens mean
nothing and the output is noise. `Codec.codes_fingerprint` hashes exactly what decides the codes
(a decoder-only change keeps it), and the DiT's config.json records the one its training tokens
came from (training/dit/export.py). The server refuses to start when they differ, unless told
otherwise (`SNAC_DIT_ALLOW_CODEC_MISMATCH=1`, for experiments), and /info says which codec,
encoder and decoder serve.
"""

from __future__ import annotations


class CodecMismatch(RuntimeError):
    """The codec makes other codes than the DiT was trained on; the message says what to do."""


def codec_report(codec, trained: dict | None, source: str | None) -> dict:
    """What /info says about the serving codec. `trained`: the DiT config's "codec" entry
    (None when the DiT's origin is unknown, e.g. an engine built in code).

    codes_match is True / False, or None when the DiT records no fingerprint to compare."""
    trained = dict(trained or {})
    if trained.get("codes_fingerprint"):
        match = trained["codes_fingerprint"] == codec.codes_fingerprint
    elif trained.get("fingerprint"):  # exported before codes fingerprints: the whole codec
        match = trained["fingerprint"] == codec.fingerprint
    else:
        match = None
    return {
        "source": source,
        "encoder": getattr(codec, "encoder_name", "snac"),
        "decoder": getattr(codec, "decoder_name", "snac"),
        # how a replacement decoder makes its phase (learned / griffin_lim / frequency)
        "decoder_phase": getattr(getattr(codec.snac.decoder, "cfg", None), "phase", None),
        "fingerprint": codec.fingerprint,
        "codes_fingerprint": codec.codes_fingerprint,
        "dit_trained_on": {k: trained.get(k) for k in ("codes_fingerprint", "fingerprint",
                                                        "source")},
        "codes_match": match,
    }


def mismatch_message(report: dict, weights: str) -> str:
    """One paragraph naming both fingerprints, the two ways out and the override."""
    trained = report["dit_trained_on"]
    if trained["codes_fingerprint"]:
        kind, theirs, ours = ("codes fingerprint", trained["codes_fingerprint"],
                              report["codes_fingerprint"])
    else:
        kind, theirs, ours = "fingerprint", trained["fingerprint"], report["fingerprint"]
    where = f" (it came from '{trained['source']}')" if trained["source"] else ""
    return (
        f"snac-dit server cannot start: the codec '{report['source']}' (SNAC_DIT_CODEC, "
        f"{kind} {ours}) is not the one the DiT '{weights}' (SNAC_DIT_WEIGHTS) was trained on "
        f"({kind} {theirs}){where}. A DiT only works with the codec whose tokens it learnt: "
        "with another it answers with noise. Serve it with its own codec, or serve a DiT "
        "trained on this codec's tokens; to serve this pair anyway (an experiment), set "
        "SNAC_DIT_ALLOW_CODEC_MISMATCH=1."
    )


def check_codec(report: dict, weights: str, allow_mismatch: bool) -> str | None:
    """Raise CodecMismatch for a mismatched pair; with the override, return the warning to log."""
    if report["codes_match"] is not False:
        return None
    if not allow_mismatch:
        raise CodecMismatch(mismatch_message(report, weights))
    trained = report["dit_trained_on"]
    return (
        f"SNAC_DIT_ALLOW_CODEC_MISMATCH is set: serving the codec '{report['source']}' (codes "
        f"fingerprint {report['codes_fingerprint']}) with the DiT '{weights}', trained on "
        f"codes {trained['codes_fingerprint'] or trained['fingerprint']}; expect noise"
    )
