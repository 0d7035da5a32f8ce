-- wrk script: the typical API GET of ../shared/peer/get.lua on an operation of the fitness
-- example, with a bearer token (env TOKEN, minted by benches/load.sh). The token is the same
-- on every request, as a real client's is for its lifetime. With VARY=1 every request names
-- another activity (`/users/alice/activities/a<n>`), so no two authorization decisions are
-- alike (Palisade's decision cache misses); without it the same list is read again and again.
local vary = os.getenv("VARY") == "1"
local n = 0
local query = "?since=2026-10-01&limit=25&sort=-started_at&fields=type,distance_m,duration_s"
wrk.method = "GET"
wrk.path = "/users/alice/activities" .. query
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Language"] = "en-GB,en;q=0.9"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
if vary then
  request = function()
    n = n + 1
    return wrk.format(nil, "/users/alice/activities/a" .. n .. query)
  end
end
