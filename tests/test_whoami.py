"""GET /api/v1/whoami over real HTTP, on both engines: the role and token name, or why not."""

from __future__ import annotations

import httpx


def test_whoami_names_each_tokens_role(secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured
    with httpx.Client(base_url=url, timeout=30) as client:
        for role, token in tokens.items():
            response = client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
            assert response.json() == {"role": role, "name": f"{role}-token", "auth": True}
        anonymous = client.get("/api/v1/whoami")
        assert anonymous.status_code == 200
        assert anonymous.json() == {"role": None, "name": None, "auth": True}
        wrong = client.get("/api/v1/whoami", headers={"Authorization": "Bearer not-a-token"})
        assert wrong.status_code == 401
        assert wrong.json()["detail"] == "invalid or revoked token"


def test_whoami_without_auth_is_the_local_operator(client: httpx.Client) -> None:
    response = client.get("/api/v1/whoami", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 200
    assert response.json() == {"role": "operator", "name": "local", "auth": False}
