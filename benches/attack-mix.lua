-- wrk script: the typical API GET of ../shared/peer/get.lua, with one request in ten carrying
-- an attack in a query parameter (rotating through SQL injection, XSS, path traversal and
-- command injection written for this benchmark). A WAF answers those 403; the rest pass.
local benign = "/api/v1/activities?athlete=1842&since=2026-10-01&limit=25&sort=-started_at&fields=type,distance_m,duration_s"
local attacks = {
  "/api/v1/activities?athlete=1842%27%20OR%201%3D1--&limit=25",
  "/api/v1/activities?q=%3Csvg%20onload%3Dalert(document.domain)%3E&limit=25",
  "/api/v1/activities?file=..%2F..%2F..%2Fetc%2Fshadow&limit=25",
  "/api/v1/activities?host=example.com%3B%20cat%20%2Fetc%2Fpasswd&limit=25",
}
local n = 0
wrk.method = "GET"
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Language"] = "en-GB,en;q=0.9"
wrk.headers["Cookie"] = "session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"
request = function()
  n = n + 1
  local path = benign
  if n % 10 == 0 then path = attacks[(n / 10) % #attacks + 1] end
  return wrk.format(nil, path)
end
