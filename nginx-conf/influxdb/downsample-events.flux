// Task (InfluxDB 2.x): 15-minute rollups of events by site, event name and note, written to
// the bucket "analytics_rollups" as measurement pf_analytics_event_15m with the fields
// events, visits, value_sum and value_count (the same fields as the InfluxQL rollup, plus the
// note as a tag). Like the InfluxQL rollups, a bucket's timestamp is its start.
//
// Create the bucket first (influx bucket create -n analytics_rollups -r 730d), then the task
// (influx task create -f downsample-events.flux). To backfill, run the pipelines below once
// with `influx query` and range(start: <first day>, stop: <the task's first run>).
//
// Visits are distinct `sess` values within one bucket and one row: they do not add up across
// buckets or notes (a visit spanning three buckets is one visit in each).
//
// `note` is free text sent by browsers: as a tag, every new value would be a new series. Only
// the notes listed here keep their own row; all others are rolled up as "(other)" and stay in
// the raw points. "" is an event sent without a note.
option task = {name: "pf_analytics_event_15m", every: 15m, offset: 1m}

notes = ["mastodon", "bluesky", "email", ""]
rollups = "analytics_rollups"

// One row per event point with its counter, note, value and sess. `value` and `sess` are
// absent from points that did not carry them; with `analytics_session tag` sess is a tag and
// arrives as a column anyway.
events =
    from(bucket: "analytics")
        |> range(start: -task.every)
        |> filter(fn: (r) => r._measurement == "pf_analytics_event")
        |> filter(
            fn: (r) =>
                r._field == "counter" or r._field == "note"
                    or r._field == "value" or r._field == "sess",
        )
        |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
        |> map(fn: (r) => ({r with note: if contains(value: r.note, set: notes) then r.note else "(other)"}))
        |> group(columns: ["domain", "event", "note"])

events
    |> aggregateWindow(every: 15m, fn: sum, column: "counter", timeSrc: "_start", createEmpty: false)
    |> rename(columns: {counter: "_value"})
    |> set(key: "_field", value: "events")
    |> set(key: "_measurement", value: "pf_analytics_event_15m")
    |> to(bucket: rollups)

events
    |> filter(fn: (r) => exists r.value)
    |> aggregateWindow(every: 15m, fn: sum, column: "value", timeSrc: "_start", createEmpty: false)
    |> rename(columns: {value: "_value"})
    |> set(key: "_field", value: "value_sum")
    |> set(key: "_measurement", value: "pf_analytics_event_15m")
    |> to(bucket: rollups)

events
    |> filter(fn: (r) => exists r.value)
    |> aggregateWindow(every: 15m, fn: count, column: "value", timeSrc: "_start", createEmpty: false)
    |> rename(columns: {value: "_value"})
    |> set(key: "_field", value: "value_count")
    |> set(key: "_measurement", value: "pf_analytics_event_15m")
    |> to(bucket: rollups)

events
    |> filter(fn: (r) => exists r.sess)
    |> aggregateWindow(
        every: 15m,
        fn: (column, tables=<-) => tables |> unique(column: column) |> count(column: column),
        column: "sess",
        timeSrc: "_start",
        createEmpty: false,
    )
    |> rename(columns: {sess: "_value"})
    |> set(key: "_field", value: "visits")
    |> set(key: "_measurement", value: "pf_analytics_event_15m")
    |> to(bucket: rollups)
