"""Issue 9 through the real app (TestClient, real SQLite file): the recommendation against a
NumPy computation on the clean window, and the level_shift, skipped and loss_spike events
derived at read time from hand-made sequences."""
from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app.factory import create_app
from gradwatch.server.app.settings import Settings

WRITE, READ = "w-token", "r-token"


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'diag.db'}", token=WRITE, read_token=READ))
    with TestClient(app, base_url="http://localhost", headers={"Authorization": f"Bearer {READ}"}) as test_client:
        yield test_client


def wire(values) -> list:
    return ["NaN" if isinstance(v, float) and math.isnan(v) else
            ("Infinity" if v == math.inf else v) for v in values]


def post(client, run: str, body: dict):
    payload = {key: (wire(value) if key in ("pre_norm", "loss") else value) for key, value in body.items()}
    answer = client.post(f"/api/runs/{run}/steps", json=payload, headers={"Authorization": f"Bearer {WRITE}"})
    assert answer.status_code == 200, answer.text
    return answer


def spiky_run(n: int = 3000, seed: int = 0):
    """Log-normal norms (sd 0.1 in log space: no clean step is near 5 robust sigmas),
    2% hand-placed spikes 30-100x, a few NaN/inf, threshold 1.3 in force."""
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.1, n))
    spikes = np.sort(rng.choice(np.arange(100, n), n // 50, replace=False))
    norms[spikes] *= rng.uniform(30, 100, len(spikes))
    nonfinite = np.array([n - 7, n - 300, 1500])
    norms[nonfinite[:2]] = np.nan
    norms[nonfinite[2]] = np.inf
    return norms, set(spikes.tolist()), set(nonfinite.tolist())


def robust_tau(clean: np.ndarray, k: float = 3.0) -> float:
    """The documented rule, written out: exp(median + k·1.4826·MAD) of the log norms,
    within [median, 10·median] of the norms."""
    logs = np.log(clean)
    median_log = np.median(logs)
    mad = np.median(np.abs(logs - median_log))
    tau = math.exp(median_log + k * 1.4826 * mad)
    return min(max(tau, np.median(clean)), 10 * np.median(clean))


@pytest.mark.parametrize("window", [None, 1000])
def test_recommendation_is_the_robust_rule_on_the_clean_window(client, window):
    n = 3000
    norms, spikes, nonfinite = spiky_run(n)
    threshold = [1.3] * n
    threshold[-1] = "NaN"  # the current threshold is the last *finite* one
    post(client, "r", {"step": list(range(n)), "pre_norm": norms.tolist(), "threshold": threshold})
    params = {} if window is None else {"window": window}
    rec = client.get("/api/runs/r/recommendation", params=params).json()

    size = 500 if window is None else window  # default: 10% of 3,000 is below the 500-step floor
    steps = np.arange(n - size, n)
    part = norms[-size:]
    is_spike = np.array([s in spikes for s in steps])
    finite = np.isfinite(part)
    clean = part[finite & ~is_spike]
    raw = part[finite]
    tau = robust_tau(clean)
    assert rec["method"] == "robust" and rec["reason"] is None
    assert rec["threshold"] == pytest.approx(tau, rel=1e-12)
    assert rec["median"] == pytest.approx(np.median(clean), rel=1e-12)
    assert rec["ratio_to_median"] == pytest.approx(tau / np.median(clean), rel=1e-12)
    assert rec["clip_rate_clean"] == np.mean(clean > tau)
    assert rec["clip_rate_raw"] == np.mean(raw > tau)
    assert rec["current_threshold"] == 1.3
    assert rec["current_clip_rate_clean"] == np.mean(clean > 1.3)
    assert rec["current_clip_rate_raw"] == np.mean(raw > 1.3)
    assert rec["clip_rate_at_1_clean"] == np.mean(clean > 1.0)
    assert rec["spikes_left_out"] == int(is_spike.sum()) > 0
    assert rec["nonfinite_left_out"] == int((~finite).sum())
    assert rec["window"]["start"] == n - size and rec["window"]["end"] == n - 1 and rec["window"]["steps"] == size
    assert rec["count"] == len(clean) == rec["window"]["clean_steps"]
    assert rec["clean_window"]["excluded"] == size - len(clean)
    assert rec["percentiles"]["p99"] == pytest.approx(np.percentile(clean, 99), rel=1e-12)
    by_label = {c["label"]: c for c in rec["candidates"]}
    assert by_label["recommended"]["threshold"] == rec["threshold"]
    for candidate in rec["candidates"]:
        assert candidate["clip_rate"] == np.mean(clean > candidate["threshold"])
        assert candidate["clip_rate_raw"] == np.mean(raw > candidate["threshold"])
    assert by_label["current"]["threshold"] == 1.3
    # the old rule (p99 of every norm) lands on the spikes; the new one does not
    assert tau < 0.1 * np.quantile(norms[np.isfinite(norms)], 0.99)
    assert f"{tau:.3g}" in rec["rationale"] and "clean steps" in rec["rationale"]

    rate = client.get("/api/runs/r/recommendation", params={**params, "target_clip_rate": 0.02}).json()
    assert rate["method"] == "target_clip_rate" and rate["target_clip_rate"] == 0.02
    assert rate["threshold"] == pytest.approx(np.quantile(clean, 0.98), rel=1e-12)


def test_recommendation_bad_input_is_422_and_too_few_steps_is_null_with_a_reason(client):
    post(client, "short", {"step": list(range(60)), "pre_norm": [1.0 + 0.01 * (s % 5) for s in range(60)]})
    for params, word in [({"window": 99}, "window"), ({"window": 0}, "window"),
                         ({"target_clip_rate": 1.0}, "target_clip_rate"),
                         ({"target_clip_rate": -0.1}, "target_clip_rate")]:
        answer = client.get("/api/runs/short/recommendation", params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert word in answer.text  # the message names the parameter
    rec = client.get("/api/runs/short/recommendation").json()
    assert rec["threshold"] is None and rec["candidates"] == []
    assert "60 clean steps" in rec["reason"] and rec["reason"] in rec["rationale"]
    assert rec["warnings"] == [rec["reason"]]
    assert client.get("/api/runs/nope/recommendation").status_code == 404


def test_whatif_and_histogram_say_which_steps_they_cover(client):
    post(client, "w", {"step": list(range(10, 410)), "pre_norm": [1.0 + (s % 9) / 10 for s in range(400)]})
    what = client.get("/api/runs/w/whatif", params={"threshold": 1.5, "window": 100}).json()
    assert what["window"] == {"start": 310, "end": 409, "steps": 100}
    assert what["clipped"] == sum(1 for s in range(300, 400) if 1.0 + (s % 9) / 10 > 1.5)
    hist = client.get("/api/runs/w/histogram").json()
    assert hist["window"] == {"start": 10, "end": 409, "steps": 400} and hist["count"] == 400


def level_shift_run(n: int = 1600, at: int = 1000):
    rng = np.random.default_rng(3)
    norms = np.exp(rng.normal(0.0, 0.05, n))
    norms[at:] *= 5.0
    return norms


def test_level_shift_event_and_the_recommendation_for_the_new_regime(client):
    n, at = 1600, 1000
    norms = level_shift_run(n, at)
    post(client, "shift", {"step": list(range(n)), "pre_norm": norms.tolist()})
    shifts = client.get("/api/runs/shift/events", params={"kind": "level_shift"}).json()
    # one event, just after the jump: more than 10 of the last 20 finite steps flagged
    assert len(shifts) == 1 and at + 10 <= shifts[0]["step"] <= at + 20
    shift_step = shifts[0]["step"]
    assert shifts[0]["detail"] == {"source": ["server"]} and shifts[0]["value"] == norms[shift_step]
    assert not client.get("/api/runs/shift/events", params={"kind": "spike"}).json()  # nothing stored

    rec = client.get("/api/runs/shift/recommendation", params={"window": 800}).json()
    assert rec["level_shift"] and rec["level_shift_steps"] == [shift_step]
    assert rec["transition_left_out"] == shift_step - at  # the flagged steps before the shift
    clean = norms[shift_step:]  # the new regime: every step from the shift on is clean
    # ... but for the odd extreme of its own noise the rule may call a spike (k about 3.25 on normal
    # noise, a false-positive rate of about 0.1%): one or two of 585 left out move τ well under 1%.
    left_out = rec["spikes_left_out"] + rec["backward_left_out"]
    assert left_out <= 2 and rec["count"] == len(clean) - left_out and rec["window"]["clean_start"] == shift_step
    assert rec["threshold"] == pytest.approx(robust_tau(clean), rel=1e-12 if not left_out else 1e-2)
    assert 4.0 < rec["median"] < 6.0 and any("level" in w for w in rec["warnings"])


def test_agent_columns_give_level_shift_and_skipped_events_and_kind_filters(client):
    n = 300
    norms = np.exp(np.random.default_rng(5).normal(0.0, 0.05, n))
    skipped = [s in (40, 41, 250) for s in range(n)]
    agent_shift = [s == 120 for s in range(n)]
    post(client, "agent", {"step": list(range(n)), "pre_norm": norms.tolist(), "skipped": skipped,
                           "level_shift": agent_shift, "threshold": [2.0] * n,
                           "time": [1.7e9 + s for s in range(n)]})
    events = client.get("/api/runs/agent/events").json()
    assert [(e["kind"], e["step"]) for e in events] == [("skipped", 250), ("level_shift", 120),
                                                        ("skipped", 41), ("skipped", 40)]
    skip = client.get("/api/runs/agent/events", params={"kind": "skipped"}).json()
    assert [e["step"] for e in skip] == [250, 41, 40]
    assert skip[0]["value"] == norms[250] and skip[0]["threshold"] == 2.0 and skip[0]["time"] == 1.7e9 + 250
    shift = client.get("/api/runs/agent/events", params={"kind": "level_shift"}).json()
    assert [(e["step"], e["detail"]) for e in shift] == [(120, {"source": ["agent"]})]
    assert client.get("/api/runs/agent/events", params={"kind": "clip"}).json() == []
    assert [e["step"] for e in client.get("/api/runs/agent/events", params={"limit": 2}).json()] == [250, 120]


def test_loss_spike_event_names_the_gradient_spike_before_it(client):
    n = 1000
    rng = np.random.default_rng(7)
    norms = np.exp(rng.normal(0.0, 0.05, n))
    loss = (2.0 + rng.normal(0.0, 0.01, n)).tolist()
    for s in range(5, n, 10):
        loss[s] = None   # steps without a recorded loss are left out, not spikes
    norms[807] *= 50.0   # a corrupted batch ...
    loss[810] = 8.0      # ... and the loss three steps later
    loss[500] = 9.0      # a loss spike with no gradient spike before it
    post(client, "loss", {"step": list(range(n)), "pre_norm": norms.tolist(), "loss": loss})
    spikes = client.get("/api/runs/loss/events", params={"kind": "loss_spike"}).json()
    assert [e["step"] for e in spikes] == [810, 500]
    assert spikes[0]["message"] == "loss spike at 810 followed the gradient spike at 807"
    assert spikes[0]["detail"]["grad_steps"] == [807] and spikes[0]["value"] == 8.0
    assert spikes[1]["message"] == "loss spike at 500" and spikes[1]["detail"]["grad_steps"] == []
    kinds = [e["kind"] for e in client.get("/api/runs/loss/events").json()]
    assert kinds == ["loss_spike", "loss_spike"]  # the agent flagged nothing; gradient spikes are not stored


def test_a_stored_event_of_the_same_kind_and_step_is_not_repeated(client):
    n = 200
    norms = np.exp(np.random.default_rng(9).normal(0.0, 0.05, n))
    body = {"step": list(range(n)), "pre_norm": norms.tolist(), "skipped": [s == 150 for s in range(n)]}
    post(client, "dup", body)
    client.app.state.store.ingest("dup", None, events=[  # as an agent's ingest message stores them
        {"kind": "skipped", "step": 150, "message": "agent: skipped"},
        {"kind": "skipped", "step": 160, "message": "agent: skipped too"}])
    events = client.get("/api/runs/dup/events", params={"kind": "skipped"}).json()
    assert [(e["step"], e["message"]) for e in events] == [(160, "agent: skipped too"), (150, "agent: skipped")]


def test_server_rules_cover_the_recent_span_and_agent_columns_the_whole_run(client):
    from gradwatch.server.analysis.derived_events import SERVER_RULE_SPAN

    n = SERVER_RULE_SPAN + 1000
    rng = np.random.default_rng(11)
    norms = np.exp(rng.normal(0.0, 0.05, n))
    loss = (2.0 + rng.normal(0.0, 0.01, n)).tolist()
    loss[200] = 9.0          # before the span: the server's rule does not look there
    loss[n - 100] = 9.0      # inside it
    post(client, "long", {"step": list(range(n)), "pre_norm": norms.tolist(), "loss": loss,
                          "skipped": [s == 3 for s in range(n)], "level_shift": [s == 4 for s in range(n)]})
    events = client.get("/api/runs/long/events").json()
    assert [(e["kind"], e["step"]) for e in events] == [("loss_spike", n - 100), ("level_shift", 4),
                                                        ("skipped", 3)]


def test_a_sign_based_optimizer_gets_the_clean_windows_first_percentile(client):
    """Lion (from the run's meta, or the request): τ is the 1st percentile of the clean window, so
    nearly every step is clipped; the request's optimizer wins over the meta; AdamW keeps the rule."""
    n = 2000
    rng = np.random.default_rng(11)
    norms = 20.0 * np.exp(rng.normal(0.0, 0.2, n))
    bursts = [(1500, 4), (1800, 6)]
    for start, length in bursts:
        norms[start:start + length] *= 50.0
    # meta reaches a run the way the agent sends it: with a batch, on the ingest WebSocket
    with client.websocket_connect("/ws/ingest", headers={"Authorization": f"Bearer {WRITE}", "Host": "localhost"}) as socket:
        for seq, (run, meta) in enumerate((("lion-meta", {"optimizer": "Lion"}),
                                           ("lion-config", {"config": {"optimizer": "lion"}}), ("plain", {}))):
            socket.send_json({"type": "batch", "seq": seq, "run": run, "meta": meta,
                              "batch": {"step": list(range(n)), "pre_norm": norms.tolist()}})
            assert socket.receive_json() == {"type": "ack", "seq": seq, "accepted": n, "duplicates": 0,
                                             "conflicts": 0}
    window = norms[-500:]
    burst_steps = {s for start, length in bursts for s in range(start, start + length)}
    clean = np.array([v for s, v in zip(range(n - 500, n), window) if s not in burst_steps])
    for run in ("lion-meta", "lion-config"):
        rec = client.get(f"/api/runs/{run}/recommendation").json()
        assert rec["method"] == "sign-based" and rec["optimizer"].lower() == "lion"
        # the two bursts, and maybe an extreme or two of the noise itself (about 0.1% of steps)
        extra = rec["spikes_left_out"] + rec["backward_left_out"] - 10
        assert rec["burst_steps_left_out"] == 10 and 0 <= extra <= 3
        assert rec["window"]["clean_steps"] == len(clean) - extra
        assert rec["threshold"] == pytest.approx(np.quantile(clean, 0.01), rel=1e-12 if not extra else 1e-2)
        assert rec["clip_rate_clean"] == pytest.approx(np.mean(clean > rec["threshold"]), abs=(extra + 1) / len(clean))
        assert rec["clip_rate_clean"] >= 0.98 and "sign-based" in rec["rationale"]
    plain = client.get("/api/runs/plain/recommendation").json()
    assert plain["method"] == "robust" and plain["optimizer"] is None and plain["ratio_to_median"] >= 1.0
    asked = client.get("/api/runs/plain/recommendation", params={"optimizer": "optim.Lion"}).json()
    assert asked["method"] == "sign-based" and asked["threshold"] < plain["median"]
    overridden = client.get("/api/runs/lion-meta/recommendation", params={"optimizer": "AdamW"}).json()
    assert overridden["method"] == "robust" and overridden["threshold"] == plain["threshold"]
    rate = client.get("/api/runs/lion-meta/recommendation", params={"target_clip_rate": 0.1}).json()
    assert rate["method"] == "target_clip_rate"   # an explicit clip rate wins
