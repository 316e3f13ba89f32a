"""Static files are served by the WSGI app itself (WhiteNoise), also with DEBUG off."""

import pytest


@pytest.mark.parametrize("path", ["/static/surveys/app.css", "/static/studies/trial.js"])
def test_static_served_without_debug(client, settings, path):
    assert settings.DEBUG is False
    response = client.get(path)
    assert response.status_code == 200
    assert b"".join(response.streaming_content)


def test_unknown_static_file_is_404(client):
    assert client.get("/static/nope/missing.js").status_code == 404
