<?php
// Gearman worker peer for the interop tests (php-gearman / libgearman: GRAB_JOB_ALL).
// Usage: php php_worker.php --host H --port P --func F [--func G] [--behavior B] [--count N]
// Behaviors: echo (result = workload), record (prints each job, result "ok:<workload>"),
//   progress (status 1/2, data, warning, status 2/2, result "done"), fail, exception,
//   block (prints the job, then never finishes).
// Prints {"event":"job",...} for each job taken, {"event":"exit"} at the end.
$o = getopt("", ["host:", "port:", "func:", "behavior:", "count:"]);
function out(array $ev) { echo json_encode($ev, JSON_UNESCAPED_SLASHES), "\n"; fflush(STDOUT); }
$behavior = $o["behavior"] ?? "echo";
$count = (int)($o["count"] ?? 0);
$worker = new GearmanWorker();
$worker->addServer($o["host"], (int)$o["port"]);
$cb = function (GearmanJob $job) use ($behavior) {
    $w = $job->workload();
    out(["event" => "job", "func" => $job->functionName(), "handle" => $job->handle(),
         "unique" => $job->unique(), "size" => strlen($w), "sha256" => hash("sha256", $w),
         // big payloads only as a digest: a full pipe would block the worker mid-job
         "data_b64" => strlen($w) <= 65536 ? base64_encode($w) : null,
         "t" => microtime(true)]);
    switch ($behavior) {
        case "echo": return $w;
        case "record": return "ok:" . $w;
        case "progress":
            $job->sendStatus(1, 2);
            $job->sendData("d1");
            $job->sendWarning("w1");
            $job->sendStatus(2, 2);
            return "done";
        case "fail":
            $job->sendFail();
            return null;
        case "exception":
            $job->sendException("boom");
            $job->sendFail();
            return null;
        case "block":
            while (true) { sleep(3600); }
    }
};
foreach ((array)$o["func"] as $f) { $worker->addFunction($f, $cb); }
$done = 0;
while ($worker->work()) {
    if ($worker->returnCode() != GEARMAN_SUCCESS) { out(["event" => "error", "rc" => $worker->returnCode()]); break; }
    if ($count && ++$done >= $count) { break; }
}
out(["event" => "exit"]);
