-- wrk script: POST one PNG digit to /v1/predict. The file comes from $LENET5_WRK_BODY.
local f = assert(io.open(os.getenv("LENET5_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
wrk.headers["Content-Type"] = "image/png"
f:close()
