<?php
// Gearman client peer for the interop tests (php-gearman / libgearman).
// Prints one JSON line per event; binary data is base64 ("*_b64" keys).
// Usage: php php_client.php --host H --port P --func F [--mode normal|high|low|bg|high_bg|low_bg]
//        [--unique U] [--payload S | --payload-file PATH] [--no-exceptions] [--callbacks]
//        [--status HANDLE] [--timeout MS]
$o = getopt("", ["host:", "port:", "func:", "mode:", "unique:", "payload:", "payload-file:",
                 "no-exceptions", "callbacks", "status:", "timeout:"]);
function out(array $ev) { echo json_encode($ev, JSON_UNESCAPED_SLASHES), "\n"; fflush(STDOUT); }

$client = new GearmanClient();
// php-gearman 2.x: addServer's third argument sets up exceptions (OPTION_REQ "exceptions").
$client->addServer($o["host"], (int)$o["port"], !isset($o["no-exceptions"]));
if (isset($o["timeout"])) { $client->setTimeout((int)$o["timeout"]); }
if (isset($o["status"])) {
    $st = $client->jobStatus($o["status"]);
    out(["event" => "status", "known" => $st[0], "running" => $st[1],
         "numerator" => $st[2], "denominator" => $st[3]]);
    exit(0);
}
$func = $o["func"];
$mode = $o["mode"] ?? "normal";
$unique = $o["unique"] ?? null;
$payload = isset($o["payload-file"]) ? file_get_contents($o["payload-file"]) : ($o["payload"] ?? "x");

if (isset($o["callbacks"])) {
    $client->setCreatedCallback(function ($t) { out(["event" => "created", "handle" => $t->jobHandle()]); });
    $client->setStatusCallback(function ($t) {
        out(["event" => "status", "numerator" => $t->taskNumerator(), "denominator" => $t->taskDenominator()]); });
    $client->setDataCallback(function ($t) { out(["event" => "data", "data_b64" => base64_encode($t->data())]); });
    $client->setWarningCallback(function ($t) { out(["event" => "warning", "data_b64" => base64_encode($t->data())]); });
    $client->setCompleteCallback(function ($t) { out(["event" => "complete", "data_b64" => base64_encode($t->data())]); });
    $client->setFailCallback(function ($t) { out(["event" => "fail"]); });
    $client->setExceptionCallback(function ($t) { out(["event" => "exception", "data_b64" => base64_encode($t->data())]); });
    $add = ["normal" => "addTask", "high" => "addTaskHigh", "low" => "addTaskLow",
            "bg" => "addTaskBackground", "high_bg" => "addTaskHighBackground", "low_bg" => "addTaskLowBackground"][$mode];
    $client->$add($func, $payload, null, $unique);
    $ok = $client->runTasks();
    out(["event" => "done", "ok" => $ok, "return_code" => $client->returnCode(), "error" => $client->error()]);
    exit(0);
}

$do = ["normal" => "doNormal", "high" => "doHigh", "low" => "doLow",
       "bg" => "doBackground", "high_bg" => "doHighBackground", "low_bg" => "doLowBackground"][$mode];
$result = $client->$do($func, $payload, $unique);
$rc = $client->returnCode();
$names = [GEARMAN_SUCCESS => "SUCCESS", GEARMAN_WORK_FAIL => "WORK_FAIL",
          GEARMAN_WORK_EXCEPTION => "WORK_EXCEPTION", GEARMAN_TIMEOUT => "TIMEOUT"];
out(["event" => "result", "return_code" => $rc, "rc" => $names[$rc] ?? (string)$rc,
     "data_b64" => base64_encode((string)$result), "handle" => $client->doJobHandle(),
     "error" => $client->error()]);
