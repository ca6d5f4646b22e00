"""The Django integration: the default client comes from settings, and the
context processor greys a button out with one {% if %} while taskgate (or
its broker) is away, without ever raising."""

from __future__ import annotations

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="taskgate-client-tests",
        INSTALLED_APPS=[],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "OPTIONS": {"context_processors": ["taskgate_client.django.async_available"]},
            }
        ],
    )
    django.setup()

from django.template import engines  # noqa: E402 - needs configured settings
from django.test import RequestFactory, override_settings  # noqa: E402

from taskgate_client import GatewayUnavailable  # noqa: E402
from taskgate_client import django as taskgate_django  # noqa: E402

BUTTON = '<button{% if not async_available %} disabled{% endif %}>Export</button>'


def render(template: str = BUTTON) -> str:
    request = RequestFactory().get("/")
    return engines["django"].from_string(template).render({}, request)


def test_the_default_client_follows_the_settings(gateway):
    with override_settings(TASKGATE_URL=gateway.url, TASKGATE_TIMEOUT=3, TASKGATE_AVAILABILITY_TTL=7):
        client = taskgate_django.get_client()
        assert client.base_url == gateway.url
        assert client.timeout == 3.0 and client.availability_ttl == 7.0
        assert taskgate_django.get_client() is client, "one client per process"
        task_id = taskgate_django.send_task("tests.record", args=[1], creator_id="u1")
        assert client.get_task(task_id)["task"] == "tests.record"
    assert taskgate_django.get_client().base_url == "http://127.0.0.1:7439", "rebuilt when settings change"


def test_the_button_is_enabled_while_async_work_is_available(gateway):
    with override_settings(TASKGATE_URL=gateway.url):
        assert render() == "<button>Export</button>"
        assert taskgate_django.is_async_available() is True


def test_the_button_is_greyed_out_while_the_broker_is_down(spooling_gateway):
    with override_settings(TASKGATE_URL=spooling_gateway.url):
        assert render() == "<button disabled>Export</button>"


def test_an_unreachable_gateway_greys_the_button_out_and_breaks_nothing(closed_url):
    with override_settings(TASKGATE_URL=closed_url, TASKGATE_AVAILABILITY_TIMEOUT=0.5):
        assert render() == "<button disabled>Export</button>"
        assert render("{{ async_available }}") == "False"
        with pytest.raises(GatewayUnavailable):
            taskgate_django.send_task("tests.record")


def test_a_page_that_does_not_read_it_never_asks(closed_url, monkeypatch):
    calls = []
    monkeypatch.setattr(taskgate_django, "is_async_available", lambda: calls.append(1) or True)
    with override_settings(TASKGATE_URL=closed_url):
        assert render("<p>no button here</p>") == "<p>no button here</p>"
        assert calls == []
        assert render() == "<button>Export</button>"
        assert calls == [1]


def test_the_events_view_relays_a_tasks_state_to_the_browser(gateway):
    with override_settings(TASKGATE_URL=gateway.url):
        response = taskgate_django.task_events(RequestFactory().get("/"), "no-worker-wrote-this-one")
        assert response["Content-Type"] == "text/event-stream"
        events = iter(response.streaming_content)
        first = next(events)
        first = first.decode() if isinstance(first, bytes) else first
        assert first.startswith("event: state\ndata: "), first
        assert '"status": "PENDING"' in first
        response.close()  # what Django does when the browser goes away


def test_the_events_view_says_when_taskgate_is_away(closed_url):
    with override_settings(TASKGATE_URL=closed_url, TASKGATE_TIMEOUT=1):
        response = taskgate_django.task_events(RequestFactory().get("/"), "any")
        events = [chunk.decode() if isinstance(chunk, bytes) else chunk for chunk in response.streaming_content]
        assert len(events) == 1 and events[0].startswith("event: unavailable"), events


def test_the_progress_tag_draws_a_bar_that_follows_the_stream():
    from django.template import Context, Engine

    engine = Engine(libraries={"taskgate": "taskgate_client.templatetags.taskgate"})
    html = engine.from_string('{% load taskgate %}{% taskgate_progress url %}').render(
        Context({"url": '/tasks/abc/events?x="1"'})
    )
    assert "<progress " in html and 'data-state="PENDING"' in html
    assert 'data-events="/tasks/abc/events?x=&quot;1&quot;"' in html, "the URL is escaped"
    assert "new EventSource(bar.dataset.events)" in html
    assert '"PROGRESS"' in html and '"SUCCESS"' in html
