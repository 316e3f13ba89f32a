"""Identity tables (issue 11, item 2): only a cohort's own researchers see its pseudonym →
identity table (superusers and staff are no exception, in the admin neither), every view
is recorded in the database and listed on the cohort page, and ``create_researcher
--staff`` does not make a superuser."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command

from surveys.models import Cohort, IdentityAccess, IdentityLink, Subject

pytestmark = pytest.mark.django_db

NAME, PID, BIRTH = "FAKEPATIENT^ALICE", "MRN-778899", "19610203"


@pytest.fixture()
def world(settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    group = Group.objects.create(name="researcher")
    owner = User.objects.create_user("owner", password="pw")
    colleague = User.objects.create_user("colleague", password="pw")
    other = User.objects.create_user("other", password="pw")
    for u in (owner, colleague, other):
        u.groups.add(group)
    root = User.objects.create_superuser("root", password="pw")
    cohort = Cohort.objects.create(name="mine", owner=owner, keep_mapping=True)
    cohort.researchers.add(owner, colleague)
    for n in range(3):
        s = Subject.objects.create(cohort=cohort, pseudonym=f"SUBJ-{n + 1:04d}", patient_key=f"k{n}")
        IdentityLink.objects.create(subject=s, patient_id=f"{PID}{n}", patient_name=NAME,
                                    birth_date=BIRTH)
    return {"cohort": cohort, "owner": owner, "colleague": colleague, "other": other, "root": root}


def mapping_url(world) -> str:
    return f"/cohorts/{world['cohort'].pk}/mapping/"


@pytest.mark.parametrize("who", ["root", "other"])
def test_superusers_and_other_researchers_never_see_the_table(client, world, who):
    client.force_login(world[who])
    assert client.get(mapping_url(world)).status_code == 404
    r = client.post(mapping_url(world))
    assert r.status_code == 404 and NAME.encode() not in r.content
    assert IdentityAccess.objects.count() == 0
    if who == "root":  # the superuser may open the cohort page, without the mapping link
        page = client.get(f"/cohorts/{world['cohort'].pk}/").content.decode()
        assert "identity-mapping" not in page and NAME not in page


@pytest.mark.parametrize("who", ["owner", "colleague"])
def test_cohort_researchers_see_it_after_confirmation_and_every_view_is_recorded(
        client, world, who, caplog):
    client.force_login(world[who])
    confirm = client.get(mapping_url(world))
    assert confirm.status_code == 200 and NAME.encode() not in confirm.content
    assert IdentityAccess.objects.count() == 0  # the confirmation page shows nothing
    for n in (1, 2):
        r = client.post(mapping_url(world), REMOTE_ADDR="192.0.2.10")
        assert r.status_code == 200 and NAME.encode() in r.content and PID.encode() in r.content
        assert r["Cache-Control"] == "private, no-store"
        assert IdentityAccess.objects.count() == n
    a = IdentityAccess.objects.first()
    assert (a.username, a.user, a.cohort, a.n_subjects, a.client_address) == (
        who, world[who], world["cohort"], 3, "192.0.2.10")
    # the audit line reaches the log under the default configuration (root level WARNING)
    assert logging.getLogger("deidstudy.audit").isEnabledFor(logging.INFO)
    lines = [r for r in caplog.records if r.name == "deidstudy.audit"]
    assert len(lines) == 2 and NAME not in caplog.text and PID not in caplog.text
    # the cohort page lists the views
    page = client.get(f"/cohorts/{world['cohort'].pk}/").content.decode()
    section = page[page.index('id="identity-views"'):]
    assert section.count(f"<td>{who}</td>") == 2 and "192.0.2.10" in section


def test_no_record_no_table(client, world, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr(IdentityAccess.objects, "create", broken)
    client.force_login(world["owner"])
    client.raise_request_exception = False
    r = client.post(mapping_url(world))
    assert r.status_code == 500 and NAME.encode() not in r.content


def test_records_outlive_the_cohort_and_the_user(client, world):
    client.force_login(world["colleague"])
    client.post(mapping_url(world))
    cohort_id = world["cohort"].pk
    world["cohort"].delete()
    world["colleague"].delete()
    a = IdentityAccess.objects.get()
    assert a.cohort is None and a.user is None
    assert a.username == "colleague" and a.cohort_label == f"#{cohort_id} mine"


def test_admin_never_shows_identities(client, world):
    links = IdentityLink.objects.all()
    # a superuser who is not a researcher of the cohort: no link at all
    client.force_login(world["root"])
    r = client.get("/admin/surveys/identitylink/")
    assert r.status_code == 200 and "0 identity links" in r.content.decode()
    assert client.get(f"/admin/surveys/identitylink/{links[0].pk}/change/").status_code == 302
    # lookups on the hidden fields would be an oracle: refused
    r = client.get("/admin/surveys/identitylink/?patient_name__startswith=F")
    assert r.status_code == 400
    # the cohort's owner, even as a superuser, sees which subjects have a link, not the identity
    world["owner"].is_staff = world["owner"].is_superuser = True
    world["owner"].save()
    client.force_login(world["owner"])
    r = client.get("/admin/surveys/identitylink/")
    assert r.status_code == 200 and "SUBJ-0001" in r.content.decode()
    r = client.get(f"/admin/surveys/identitylink/{links[0].pk}/change/")
    assert r.status_code == 200
    for value in (NAME, PID, BIRTH, "FAKEPATIENT"):
        assert value not in r.content.decode()
    assert mapping_url(world) in r.content.decode()
    assert client.get("/admin/surveys/identitylink/?birth_date=19610203").status_code == 400
    # the audit cannot be edited or deleted from the admin
    client.post(mapping_url(world))
    access = IdentityAccess.objects.get()
    assert client.get(f"/admin/surveys/identityaccess/{access.pk}/delete/").status_code == 403
    r = client.post(f"/admin/surveys/identityaccess/{access.pk}/change/", {"username": "x"})
    assert r.status_code == 403
    assert IdentityAccess.objects.get().username == "owner"


def test_staff_option_makes_an_operator_not_a_superuser(client, world, monkeypatch):
    import fakeredis
    import redis

    call_command("create_researcher", "ops", "--password", "ops-pw-123", "--staff", stdout=None)
    ops = User.objects.get(username="ops")
    assert ops.is_staff and not ops.is_superuser
    client.force_login(ops)
    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, *a, **k: fake))
    assert client.get("/django-rq/").status_code == 200
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/surveys/stagerun/").status_code == 200
    assert client.get("/admin/surveys/identityaccess/").status_code == 200
    # no account management (it could make itself a superuser), no identity table
    assert client.get("/admin/auth/user/").status_code == 403
    assert client.get(f"/admin/auth/user/{ops.pk}/change/").status_code == 403
    assert client.get(mapping_url(world)).status_code == 404
    # running the command again without --staff takes the rights away
    call_command("create_researcher", "ops", "--password", "ops-pw-123", stdout=None)
    ops.refresh_from_db()
    assert not ops.is_staff and not ops.is_superuser
    assert not ops.groups.filter(name="operator").exists()
    call_command("create_researcher", "boss", "--superuser", stdout=None)
    assert User.objects.get(username="boss").is_superuser


@pytest.mark.django_db
def test_demo_account_with_a_password_starting_with_a_dash():
    """The demo's random password starts with "-" one time in 64 (token_urlsafe): it must
    reach create_researcher as the password, not be parsed as an option (a fresh-clone CI run
    once failed on exactly that)."""
    from surveys.management.commands.demo import _create_researcher

    _create_researcher("demo-ops", "-Xy_z0AbC1dE")
    ops = User.objects.get(username="demo-ops")
    assert ops.check_password("-Xy_z0AbC1dE") and ops.is_staff and not ops.is_superuser
