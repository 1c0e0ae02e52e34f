// Graph: events per 1-hour window for one site, one line per event name (InfluxDB 2.x).
//
// The first graph of the original events design, on today's points: sum the "counter" field
// of pf_analytics_event by event name. In a dashboard cell, use v.timeRangeStart,
// v.timeRangeStop and v.windowPeriod instead of `start` and `every` below.
site = "www.example.com"
start = -7d
every = 1h

from(bucket: "analytics")
    |> range(start: start)
    |> filter(fn: (r) => r._measurement == "pf_analytics_event" and r._field == "counter")
    |> filter(fn: (r) => r.domain == site)
    // Columns that split one event name into many series. `sess` is a column only with
    // `analytics_session tag`, platform and timezone only when the beacon carried them, and
    // drop(columns: [...]) fails on a missing column: drop(fn: ...) does not.
    |> drop(
        fn: (column) =>
            column == "sess" or column == "type" or column == "page"
                or column == "platform" or column == "timezone",
    )
    |> group(columns: ["event"])
    |> aggregateWindow(every: every, fn: sum, createEmpty: true)
    |> fill(value: 0)
