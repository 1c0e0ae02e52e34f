-- wrk script of bench/run.sh, overload.sh and spool.sh: every request is an event beacon with
-- a new sess_id (thread number and a per-thread counter).
local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("id", threads)
end
function init(args)
    n = 0
    wrk.headers["Host"] = "www.example.com"
    wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"
end
function request()
    n = n + 1
    local body = '{"domain":"www.example.com","page":"/posts/blog/general/share-buttons.html",'
        .. '"timezone":-60,"platform":"Linux x86_64","sess_id":"' .. id .. '-' .. n .. '",'
        .. '"event":"socialclick","note":"mastodon"}'
    return wrk.format("POST", nil, nil, body)
end
