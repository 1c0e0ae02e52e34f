// Graph: one event's notes per 1-day window for one site, one line per note (InfluxDB 2.x):
// which share button was clicked, say.
//
// The second graph of the original events design. `note` is a string field, so each point's
// "counter" and "note" fields are first joined into one row (pivot on the field name), then
// the rows are grouped by note. Every point has its own timestamp (the module never gives two
// beacons the same one), so pivoting on _time never merges two points.
site = "www.example.com"
name = "socialclick"
start = -30d
every = 1d

from(bucket: "analytics")
    |> range(start: start)
    |> filter(fn: (r) => r._measurement == "pf_analytics_event")
    |> filter(fn: (r) => r.domain == site and r.event == name)
    |> filter(fn: (r) => r._field == "counter" or r._field == "note")
    |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
    // `sess` is a tag (a column) only with `analytics_session tag`: drop(fn: ...) because
    // drop(columns: ["sess"]) would fail when it is absent.
    |> drop(fn: (column) => column == "sess" or column == "type")
    |> map(fn: (r) => ({r with _value: r.counter, note: if r.note == "" then "(no note)" else r.note}))
    |> group(columns: ["note"])
    |> aggregateWindow(every: every, fn: sum, createEmpty: false)
