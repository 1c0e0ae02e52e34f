// Task (InfluxDB 2.x): 15-minute rollups of page views, written to the bucket
// "analytics_rollups" as measurement pf_analytics_15m with the fields pageviews, visits,
// load_time_sum and load_time_count: the InfluxQL rollup cq_pf_analytics_15m for InfluxDB 2.x.
// Create the bucket and the task as for downsample-events.flux.
//
// The shape of the original downsampling task: every series is rolled up as it is, so a tag
// that a page view did not have (referrer, platform, timezone) is absent from its rollup row
// too, without naming it; only the columns that must not be tags are left out of the group.
// Visits are distinct `sess` values within one bucket and one row: they do not add up across
// buckets or rows.
option task = {name: "pf_analytics_15m", every: 15m, offset: 1m}

rollups = "analytics_rollups"

// One row per page view with its counter, load_time and sess (sess is a field by default, a
// tag with `analytics_session tag`; either way a column after the pivot, or absent).
views =
    from(bucket: "analytics")
        |> range(start: -task.every)
        |> filter(fn: (r) => r._measurement == "pf_analytics")
        |> filter(
            fn: (r) => r._field == "counter" or r._field == "load_time" or r._field == "sess",
        )
        |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
        |> drop(fn: (column) => column == "type" or column == "pages_viewed")
        // Group by every tag this series has, whichever they are: all columns except these.
        |> group(columns: ["_time", "_measurement", "counter", "load_time", "sess"], mode: "except")

views
    |> aggregateWindow(every: 15m, fn: sum, column: "counter", timeSrc: "_start", createEmpty: false)
    |> rename(columns: {counter: "_value"})
    |> set(key: "_field", value: "pageviews")
    |> set(key: "_measurement", value: "pf_analytics_15m")
    |> to(bucket: rollups)

views
    |> filter(fn: (r) => exists r.load_time)
    |> aggregateWindow(every: 15m, fn: sum, column: "load_time", timeSrc: "_start", createEmpty: false)
    |> rename(columns: {load_time: "_value"})
    |> set(key: "_field", value: "load_time_sum")
    |> set(key: "_measurement", value: "pf_analytics_15m")
    |> to(bucket: rollups)

views
    |> filter(fn: (r) => exists r.load_time)
    |> aggregateWindow(every: 15m, fn: count, column: "load_time", timeSrc: "_start", createEmpty: false)
    |> rename(columns: {load_time: "_value"})
    |> set(key: "_field", value: "load_time_count")
    |> set(key: "_measurement", value: "pf_analytics_15m")
    |> to(bucket: rollups)

views
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
    |> set(key: "_measurement", value: "pf_analytics_15m")
    |> to(bucket: rollups)
