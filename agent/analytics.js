(() => {
  "use strict";
  const queue = (window.recordEvent || {}).q || [];
  const safe = f => (...a) => { try { return f(...a); } catch (e) {} };
  window.recordEvent = () => {};
  if ((navigator.doNotTrack || window.doNotTrack) == "1" || navigator.globalPrivacyControl) return;
  safe(() => {
    const { dataset, src } = document.currentScript;
    const url = dataset.endpoint || new URL("collect", src);
    const store = safe(() => sessionStorage)() || {};
    const sess = "noSession" in dataset ? null :
      (store.na_sess = store.na_sess || crypto.getRandomValues(new Uint32Array(2)).join("-"));
    const send = (body, retry) => {
      try {
        fetch(url, { method: "POST", body, keepalive: true, credentials: "omit" }).then(r =>
          r.status == 502 && !retry && setTimeout(send, 1e3 + 1e3 * Math.random(), body, 1), () => {});
      } catch (e) {
        navigator.sendBeacon(url, body);
      }
    };
    const beacon = b => send(JSON.stringify(Object.assign(b, {
      domain: location.hostname, page: location.pathname, platform: navigator.platform,
      timezone: new Date().getTimezoneOffset(), sess_id: sess,
    })));
    window.recordEvent = safe((event, note, value) => beacon({
      event: String(event), note: note == null ? null : String(note), value: parseFloat(value),
    }));
    queue.forEach(a => window.recordEvent(...a));
    let last;
    const view = safe(() => {
      if (location.pathname == last) return;
      const r = document.referrer;
      const b = { pages_viewed: store[location.hostname] = +store[location.hostname] + 1 || 1 };
      if (!last) {
        b.load_time = Math.round((performance.getEntriesByType("navigation")[0] || {}).loadEventStart);
        if (r && new URL(r).hostname != location.hostname) b.referrer = r;
      }
      last = location.pathname;
      beacon(b);
    });
    const start = () => {
      view();
      for (const m of ["pushState", "replaceState"]) {
        const f = history[m];
        history[m] = (...a) => { f.apply(history, a); view(); };
      }
      addEventListener("popstate", view);
    };
    document.readyState == "complete" ? start() : addEventListener("load", start);
  })();
})();
