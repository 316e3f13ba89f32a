"""Shared storage on an S3-compatible HTTP endpoint (moto's server on 127.0.0.1).

The storage is configured exactly as on a deployment, from the environment variables
read by ``deidstudy.settings.shared_storage_config`` (``DEIDSTUDY_SHARED_STORAGE=s3``,
bucket, endpoint URL, region, path-style addressing, key prefix, credentials), and
django-storages/boto3 talk HTTP to the endpoint as they would to MinIO, Ceph or AWS.
The bucket is listed with a separate plain HTTP client, so what the tests see is what
the server holds. Machine A imports; machine B (an empty DATA_DIR) runs the stages
from the bucket; machine C (empty again) serves images and the download.
"""

from __future__ import annotations

import io
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import User

from deidstudy.settings import shared_storage_config
from surveys.cohorts.importing import import_folder
from surveys.models import Cohort
from surveys.processing import jobs
from surveys.storage.mirror import shared_storage
from tests.factories.dicom_cohorts import FAKE_MARKER, write_synthetic_cohort
from tests.test_web_shared_storage import _files, _run

PREFIX = "study-x"
_S3_NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _http(method: str, url: str) -> bytes:
    with _HTTP.open(urllib.request.Request(url, method=method), timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def s3_endpoint():
    """URL of an S3-compatible server (moto) on 127.0.0.1, one per test module."""
    from moto.server import ThreadedMotoServer  # moto[server], see requirements.txt

    wlog = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    level = wlog.level
    wlog.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # free port
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + 30
        while True:  # readiness: any HTTP answer
            try:
                _http("GET", url + "/")
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        server.stop()
        wlog.setLevel(level)


@dataclass
class Bucket:
    endpoint: str
    name: str

    def keys(self) -> set[str]:
        """Every key in the bucket (ListObjectsV2 over plain HTTP, all pages)."""
        keys: set[str] = set()
        token = None
        while True:
            q = {"list-type": "2", **({"continuation-token": token} if token else {})}
            root = ET.fromstring(_http("GET", f"{self.endpoint}/{self.name}?"
                                              f"{urllib.parse.urlencode(q)}"))
            keys |= {k.text for k in root.iterfind("s3:Contents/s3:Key", _S3_NS)}
            if root.findtext("s3:IsTruncated", namespaces=_S3_NS) != "true":
                return keys
            token = root.findtext("s3:NextContinuationToken", namespaces=_S3_NS)

    def data_keys(self) -> set[str]:
        """The keys as ``DATA_DIR``-relative paths (prefix checked and removed)."""
        keys = self.keys()
        assert all(k.startswith(PREFIX + "/") for k in keys), keys
        return {k[len(PREFIX) + 1:] for k in keys}


@pytest.fixture()
def s3(settings, monkeypatch, tmp_path, s3_endpoint) -> Bucket:
    """A fresh bucket, configured through the settings' environment variables."""
    bucket = Bucket(s3_endpoint, f"deidstudy-{uuid.uuid4().hex[:12]}")
    _http("PUT", f"{s3_endpoint}/{bucket.name}")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_S3_ACCESS_KEY_ID", "AWS_S3_SECRET_ACCESS_KEY",
                "AWS_S3_SESSION_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {
        "DEIDSTUDY_SHARED_STORAGE": "s3",
        "AWS_STORAGE_BUCKET_NAME": bucket.name,
        "AWS_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_S3_REGION_NAME": "us-east-1",
        "AWS_S3_ADDRESSING_STYLE": "path",
        "DEIDSTUDY_S3_PREFIX": PREFIX,
        "AWS_ACCESS_KEY_ID": "deidstudy-test-key",
        "AWS_SECRET_ACCESS_KEY": "deidstudy-test-secret",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),  # ignore the user's ~/.aws
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    }.items():
        monkeypatch.setenv(var, value)
    settings.STORAGES = {**settings.STORAGES, "cohortdata": shared_storage_config()}
    settings.PIPELINE_FACE_METHOD = "anatomical"
    settings.PIPELINE_RENDER_BACKEND = "raycast"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    storage = shared_storage()
    assert type(storage).__name__ == "S3Storage" and storage.endpoint_url == s3_endpoint
    return bucket


def _assert_pseudonymous(keys: set[str], cohort: Cohort, idents) -> None:
    """Every key is ``cohorts/cNNNNN/<part>/<pseudonym>/…`` (or the cohort's re-id plot)
    and contains none of the fake identities."""
    pseudonyms = set(cohort.subjects.values_list("pseudonym", flat=True))
    base = cohort.storage_dir().split("/")
    assert keys
    for key in keys:
        parts = key.split("/")
        assert parts[:2] == base and parts[2] in {"orig", "deid", "derived"}, key
        assert parts[3] in pseudonyms or parts[2:] == ["derived", "reid-cmc.png"], key
    needles = {FAKE_MARKER.lower()}
    for ident in idents:
        needles |= {ident.patient_id, ident.birth_date, ident.patient_name.replace("^", "_"),
                    *ident.patient_name.split("^")}
    for key in keys:
        assert not any(n.lower() in key.lower() for n in needles), key


@pytest.mark.slow
def test_stages_run_on_machines_that_share_only_the_s3_bucket(db, settings, tmp_path, s3,
                                                               client, monkeypatch):
    monkeypatch.setattr(jobs, "enqueue_stage", lambda run, queue=None: "")  # run by hand
    user = User.objects.create_user("r", password="pw", is_staff=True)
    cohort = Cohort.objects.create(name="c", owner=user)
    cohort.researchers.add(user)
    src = tmp_path / "src"
    idents = write_synthetic_cohort(src, 2, size="tiny", seed=51)

    # Machine A: the import uploads the originals before its transaction commits.
    settings.DATA_DIR = tmp_path / "machineA"
    at_commit: dict[str, set[str]] = {}
    import_folder(cohort, src, move=False,
                  before_commit=lambda result: at_commit.setdefault("keys", s3.data_keys()))
    local_a = _files(tmp_path / "machineA")
    assert at_commit["keys"] == local_a and len(local_a) == 80
    assert all("/orig/" in k for k in local_a)
    for subject in cohort.subjects.all():
        _run(subject.stages.get(stage="import"))

    # A stale file of an earlier run: the next de-identification must delete it remotely.
    first = cohort.subjects.order_by("pseudonym").first()
    stale = f"{first.series.first().original_dir}/IM09999.dcm".replace("/orig/", "/deid/")
    shared_storage().save(stale, io.BytesIO(b"stale"))
    assert stale in s3.data_keys()

    # Machine B (empty DATA_DIR): downloads what each stage needs, runs, uploads outputs.
    # Sizes and times come with the folder listing: no request per file to compare them.
    def no_size_request(self, name):
        raise AssertionError("one request per file")

    settings.DATA_DIR = tmp_path / "machineB"
    with monkeypatch.context() as m:
        m.setattr(type(shared_storage()), "size", no_size_request)
        m.setattr(type(shared_storage()), "get_modified_time", no_size_request)
        for subject in cohort.subjects.all():
            for stage in ("deidentify", "surfaces", "embeddings"):
                _run(subject.stages.get(stage=stage))
    assert cohort.reid.n_subjects == 2
    remote = s3.data_keys()
    local_b = _files(tmp_path / "machineB")
    assert local_a <= local_b  # originals downloaded by B
    assert stale not in remote and stale not in local_b
    assert remote == local_b  # every output of B uploaded, nothing else left remotely
    deid = {k for k in remote if "/deid/" in k}
    assert len(deid) == 80 and all(k.endswith(".dcm") for k in deid)
    assert sum(k.endswith("render-yaw+0-deid.png") for k in remote) == 2
    assert f"{cohort.storage_dir()}/derived/reid-cmc.png" in remote
    _assert_pseudonymous(remote, cohort, idents)

    # Machine C (empty DATA_DIR): the web server downloads a file on first request.
    settings.DATA_DIR = tmp_path / "machineC"
    client.force_login(user)
    img = first.images.get(kind="render", variant="deid", view="yaw+0")
    assert not (tmp_path / "machineC" / img.path).exists()
    r = client.get(f"/cohorts/{cohort.pk}/images/{img.pk}.png")
    assert r.status_code == 200 and b"".join(r.streaming_content)[:4] == b"\x89PNG"
    assert (tmp_path / "machineC" / img.path).is_file()
    assert client.get(f"/cohorts/{cohort.pk}/reid-cmc.png").status_code == 200
    r = client.get(f"/cohorts/{cohort.pk}/download/deidentified.zip")
    names = zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content))).namelist()
    assert sum(n.endswith(".dcm") for n in names) == 80
    assert s3.data_keys() == remote  # reading changed nothing remotely


@pytest.mark.slow
def test_failed_import_leaves_nothing_in_the_s3_bucket(db, settings, tmp_path, s3, monkeypatch):
    from surveys.cohorts import importing

    user = User.objects.create_user("r", password="pw")
    cohort = Cohort.objects.create(name="c", owner=user)
    src = tmp_path / "src"
    write_synthetic_cohort(src, 3, size="tiny", seed=54)
    settings.DATA_DIR = tmp_path / "machineA"
    real = importing.push_tree
    calls: list[set[str]] = []

    def flaky(rel, **kw):
        calls.append(s3.data_keys())
        if len(calls) == 2:  # the second subject's upload fails (the clean-up calls work)
            raise OSError(5, "Input/output error")
        return real(rel, **kw)

    monkeypatch.setattr(importing, "push_tree", flaky)
    with pytest.raises(OSError):
        import_folder(cohort, src, move=False)
    assert len(calls) == 5 and len(calls[1]) == 40  # the first subject reached the bucket…
    assert s3.keys() == set()  # …and was removed again
    assert _files(tmp_path / "machineA") == set() and cohort.subjects.count() == 0


def test_settings_build_the_s3_storage_from_the_environment(tmp_path):
    env = {"DEIDSTUDY_SHARED_STORAGE": "s3", "AWS_STORAGE_BUCKET_NAME": "cohorts",
           "AWS_S3_ENDPOINT_URL": "https://minio.example.org:9000",
           "AWS_S3_ADDRESSING_STYLE": "Path", "DEIDSTUDY_S3_PREFIX": "/site-a/"}
    opts = shared_storage_config(env)["OPTIONS"]
    assert opts["bucket_name"] == "cohorts" and opts["addressing_style"] == "path"
    assert opts["endpoint_url"] == "https://minio.example.org:9000"
    assert opts["location"] == "site-a" and opts["region_name"] is None
    assert opts["default_acl"] is None  # buckets with ACLs disabled refuse any other ACL
    assert shared_storage_config({"DEIDSTUDY_SHARED_STORAGE": "s3",
                                  "AWS_STORAGE_BUCKET_NAME": "b"})["OPTIONS"]["location"] \
        == "deidstudy"
    assert shared_storage_config({}) is None
    assert shared_storage_config({"DEIDSTUDY_SHARED_STORAGE": f"path:{tmp_path}"})[
        "OPTIONS"] == {"location": str(tmp_path)}
    for bad, msg in (({"DEIDSTUDY_SHARED_STORAGE": "s3"}, "AWS_STORAGE_BUCKET_NAME"),
                     ({**env, "AWS_S3_ADDRESSING_STYLE": "dns"}, "AWS_S3_ADDRESSING_STYLE"),
                     ({"DEIDSTUDY_SHARED_STORAGE": "path:"}, "DEIDSTUDY_SHARED_STORAGE"),
                     ({"DEIDSTUDY_SHARED_STORAGE": "gcs"}, "DEIDSTUDY_SHARED_STORAGE")):
        with pytest.raises(RuntimeError, match=msg):
            shared_storage_config(bad)


def test_served_files_follow_the_s3_copy(settings, tmp_path, s3):
    """ensure_local revalidates against the bucket with one HEAD request per file."""
    from surveys.storage.mirror import ensure_local, push_file

    rel = "cohorts/c00001/derived/P0001/surfaces/render-yaw+0-deid.png"
    for machine, content in (("machineA", b"first run"), ("machineB", b"the second run")):
        settings.DATA_DIR = tmp_path / machine
        (tmp_path / machine / rel).parent.mkdir(parents=True)
        (tmp_path / machine / rel).write_bytes(content)
        push_file(rel)
        settings.DATA_DIR = tmp_path / "machineC"
        assert ensure_local(rel).read_bytes() == content
    inode = (tmp_path / "machineC" / rel).stat().st_ino
    assert ensure_local(rel).stat().st_ino == inode  # unchanged: not downloaded again
    missing = "cohorts/c00001/derived/P0001/surfaces/missing.png"
    assert not ensure_local(missing).exists()  # 404 from the bucket: no error, nothing fetched
