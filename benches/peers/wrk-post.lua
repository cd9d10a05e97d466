-- wrk script for publish-on-post: every request is a small JSON POST (what a form or an API
-- write through the proxy looks like); the URL's path is the one the publish_on rule matches.
wrk.method = "POST"
wrk.body = '{"status":"paid"}'
wrk.headers["Content-Type"] = "application/json"
