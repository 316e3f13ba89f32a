"""Shared helpers of the study tests: a tiny cohort of distinct synthetic renders.

Every PNG carries text chunks with the subject's pseudonym, variant and view and its file
name holds the pseudonym, so blinding tests can check that none of it reaches a rater.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

VIEWS = ("yaw+0", "yaw+30")


def synthetic_png(seed: int, variant: str, view: str, pseudonym: str, size: int = 48) -> bytes:
    """A distinct grey/colour pattern per subject (seed) with identifying PNG text chunks."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    if variant == "deid":
        img[size // 3:, :, :] //= 2
    if view != VIEWS[0]:
        img = img[:, ::-1]
    info = PngImagePlugin.PngInfo()
    info.add_text("subject", pseudonym)
    info.add_text("variant", variant)
    info.add_text("view", view)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def make_render_cohort(data_dir: Path, owner, n_subjects: int = 12, views=VIEWS, name: str = "C1"):
    """Cohort with ``n_subjects`` subjects (SUBJ-0001…) and original+deid renders per view.

    The default 12 fit :func:`make_study`'s design: 4 subjects reserved for practice, 8 left
    for the 8 main trials (between design: each scored subject once per rater)."""
    from surveys.models import Cohort, RenderImage, Subject

    cohort = Cohort.objects.create(name=name, owner=owner)
    cohort.researchers.add(owner)
    for n in range(n_subjects):
        ps = f"SUBJ-{n + 1:04d}"
        subj = Subject.objects.create(cohort=cohort, pseudonym=ps, patient_key=f"key{n}{name}")
        for variant in ("original", "deid"):
            for view in views:
                rel = f"{cohort.storage_dir()}/derived/{ps}/render-{view}-{variant}.png"
                path = Path(data_dir) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(synthetic_png(n, variant, view, ps))
                RenderImage.objects.create(subject=subj, kind="render", variant=variant,
                                           view=view, path=rel)
    return cohort


def make_researcher(username: str = "res", password: str = "pw-123456"):
    """A user in the researcher group."""
    from django.contrib.auth.models import Group, User

    user = User.objects.create_user(username, password=password)
    user.groups.add(Group.objects.get_or_create(name="researcher")[0])
    return user


def make_study(cohort, owner, **kw):
    """A study with small defaults: k=4, both conditions, 2 views, 8 trials, 1 practice, 1 catch,
    the between-rater design (the model's default), general = the public."""
    from surveys.models import Study

    params = dict(name="S", cohort=cohort, created_by=owner, n_choices=4,
                  conditions=["control", "deidentified"], views=list(VIEWS), trials_per_rater=8,
                  n_practice=1, n_catch=1, groups=["general", "plastic surgeon"],
                  lay_groups=["general"], seed=1234)
    params.update(kw)
    return Study.objects.create(**params)


def questionnaire_answers(rater, profession: str | None = None, years: int = 3) -> dict:
    """POST data of the questionnaire for ``rater``: professional groups give years of
    experience, groups of the public how often they see medical images."""
    if rater.study.is_lay(rater.group):
        return {"profession": profession or "not a healthcare professional",
                "familiarity": "never"}
    return {"profession": profession or rater.group, "years_experience": years}


def run_rater(client, invitation_token: str, profession: str | None = None, years: int = 3,
              answer=lambda trial: 1, confidence: int | None = None, rt_ms=lambda trial: 500):
    """Drive one rater through the whole flow with the Django test client; returns the Rater.

    ``profession`` is the questionnaire's answer (default: consistent with the group).
    ``answer(trial)`` gives the 1-based choice for a Trial row (server side knowledge,
    used only by the test to steer correctness).
    """
    from surveys.models import Rater
    from surveys.studies.rater_views import SESSION_KEY

    r = client.post(f"/take/i/{invitation_token}/")
    assert r.status_code == 302, r.status_code
    rater = Rater.objects.get(resume_token=client.session[SESSION_KEY])
    client.post("/take/consent/", {"agree": "yes"})
    r = client.post("/take/about-you/", questionnaire_answers(rater, profession, years))
    assert r.status_code == 302, r.context["form"].errors if r.context else r.status_code
    client.post("/take/instructions/")
    while True:
        r = client.get("/take/trial/")
        if r.status_code == 302:
            assert r["Location"].endswith("/take/thanks/"), r["Location"]
            rater.refresh_from_db()
            return rater
        assert r.status_code == 200
        trial = r.context["trial"]
        data = {"trial": trial.token, "choice": answer(trial), "rt_ms": str(rt_ms(trial))}
        if confidence is not None:
            data["confidence"] = confidence
        client.post("/take/trial/", data)


def make_finished_study(data_dir: Path, groups=("general", "plastic surgeon"), per_group: int = 4,
                        seed: int = 7, **study_kw):
    """A study with ``per_group`` finished raters per group and realistic answers.

    Answers are drawn from a seeded rng: control right with p = 0.85, de-identified with
    0.55 (+0.15 for groups after the first); the last rater of the first group fails every
    catch trial (excluded by the default rule). The cohort gets an automated
    re-identification summary. Returns ``(study, user)``.
    """
    from django.test import Client

    from surveys.models import Invitation, ReidSummary

    rng = np.random.default_rng(seed)
    user = make_researcher()
    cohort = make_render_cohort(data_dir, user)
    params = dict(groups=list(groups), lay_groups=[groups[0]], ask_confidence=True)
    params.update(study_kw)
    study = make_study(cohort, user, **params)
    # an automated result as the embeddings stage stores it (pipeline.reid.evaluate_study):
    # control probes re-identified, de-identified probes weakly (one matcher, 12 subjects)
    from pipeline.reid import evaluate_study

    ids = [f"S{n:02d}" for n in range(12)]
    noise = np.random.default_rng(seed + 1)
    sims = {"appearance": {"control": np.eye(12) + 0.3 * noise.random((12, 12)),
                           "deidentified": 0.25 * np.eye(12) + noise.random((12, 12))}}
    metrics = evaluate_study(sims, ids, n_bootstrap=200)
    de = metrics["matchers"][metrics["primary"]]["deidentified"]
    ReidSummary.objects.create(cohort=cohort, n_subjects=12, rank1=de["rank1"], auc=de["auc"],
                               cmc=de["cmc"], baseline_rank1=1.0, metrics=metrics)
    for gi, g in enumerate(groups):
        inv = Invitation.objects.create(study=study, group=g)
        for n in range(per_group):
            careless = gi == 0 and n == per_group - 1

            def answer(t, careless=careless, gi=gi):
                if t.kind == "catch":
                    ok = not careless
                elif t.kind == "practice":
                    ok = True
                else:
                    p = 0.85 if t.condition == "control" else 0.55 + (0.15 if gi else 0.0)
                    ok = rng.random() < p
                k = t.rater.study.n_choices
                return t.correct_index + 1 if ok else (t.correct_index + 1) % k + 1

            run_rater(Client(), inv.token, answer=answer, confidence=int(rng.integers(1, 6)),
                      rt_ms=lambda t: round(float(rng.uniform(400, 1400)), 1))
    study.refresh_from_db()
    return study, user
