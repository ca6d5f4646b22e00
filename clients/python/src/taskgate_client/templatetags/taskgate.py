"""``{% taskgate_progress events_url %}``: a progress bar fed by a task's
event stream (the :func:`taskgate_client.django.task_events` view).

It renders a ``<progress>`` element and a few lines of script that follow
the stream: ``PROGRESS`` with ``{"done": n, "total": m}`` (or
``{"current": n, "total": m}``) moves the bar, ``SUCCESS`` fills it,
``FAILURE`` or ``REVOKED`` marks it failed (``data-state`` on the element,
for styling). No other script or stylesheet is needed.
"""

from __future__ import annotations

import uuid

from django import template
from django.utils.html import format_html

register = template.Library()

_SCRIPT = """(function () {{
  var bar = document.getElementById("{id}"), label = document.getElementById("{id}-label");
  var source = new EventSource(bar.dataset.events);
  source.addEventListener("state", function (event) {{
    var state = JSON.parse(event.data), meta = state.result || {{}};
    bar.dataset.state = state.status;
    var done = meta.done !== undefined ? meta.done : meta.current, total = meta.total;
    if (state.status === "PROGRESS" && total) {{ bar.max = total; bar.value = done; label.textContent = done + " / " + total; }}
    if (state.status === "SUCCESS") {{ bar.max = 1; bar.value = 1; label.textContent = "done"; source.close(); }}
    if (state.status === "FAILURE" || state.status === "REVOKED") {{ label.textContent = "failed"; source.close(); }}
  }});
  source.addEventListener("unavailable", function () {{ label.textContent = "progress unavailable"; source.close(); }});
}})();"""


@register.simple_tag
def taskgate_progress(events_url: str, label: str = "Progress") -> str:
    element_id = "taskgate-progress-" + uuid.uuid4().hex[:12]
    return format_html(
        '<progress id="{}" data-events="{}" data-state="PENDING" aria-label="{}"></progress>'
        ' <span id="{}-label" aria-live="polite"></span><script>{}</script>',
        element_id,
        events_url,
        label,
        element_id,
        format_html(_SCRIPT, id=element_id),
    )
