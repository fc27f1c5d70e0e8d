<?php
// A test worker that behaves like AtoM's `php symfony jobs:worker` (arWorkerJobsTask):
// client id pid_<PID>_<uniqid>, one function per --function, exit 111 after --max-jobs
// (AtoM's --max-job-count), killed at once by SIGTERM even mid-job.
//
// php atom_like_worker.php --server 127.0.0.1:PORT --function f1 [--function f2] [--max-jobs N]
//     [--start-delay SECONDS]
//
// Job payloads: "crash" or JSON with "crash": true (exit 1 mid-job: php-gearman then sends
// WORK_FAIL), JSON with "kill": true (SIGKILL mid-job: the connection just closes), "hang" (never returns), "grow:N" (allocate N MiB
// and keep it), "exit111" (planned exit mid-job), anything else: returned upper-cased.

$servers = array();
$functions = array();
$maxJobs = 0;
$startDelay = 0.0;
for ($i = 1; $i < $argc; $i++) {
    switch ($argv[$i]) {
        case '--server': $servers[] = $argv[++$i]; break;
        case '--function': $functions[] = $argv[++$i]; break;
        case '--max-jobs': $maxJobs = (int) $argv[++$i]; break;
        case '--start-delay': $startDelay = (float) $argv[++$i]; break;
        default:
            fwrite(STDERR, "unknown argument {$argv[$i]}\n");
            exit(2);
    }
}
if (!$servers) {
    $env = getenv('ATOMNODE_SERVERS');
    $servers = $env ? explode(',', $env) : array('127.0.0.1:4730');
}
if (!$functions) {
    fwrite(STDERR, "no --function given\n");
    exit(2);
}

$kept = array();   // memory held by grow:N jobs
$jobsDone = 0;

if ($startDelay > 0) {
    // AtoM's worker loads symfony, its configuration and the database before it connects.
    usleep((int) ($startDelay * 1000000));
}
$worker = new GearmanWorker();
foreach ($servers as $s) {
    list($host, $port) = explode(':', $s);
    $worker->addServer($host, (int) $port);
}
$worker->setId('pid_'.getmypid().'_'.uniqid());

$handler = function (GearmanJob $job) use (&$kept, &$jobsDone) {
    $data = $job->workload();
    echo "job {$job->handle()} {$job->functionName()}: {$data}\n";
    $json = json_decode($data, true);
    if (is_array($json) && !empty($json['kill'])) {
        fwrite(STDERR, "killed mid-job\n");
        posix_kill(getmypid(), 9);  // dies as a PHP fatal error or the OOM killer would
    }
    if ($data === 'crash' || (is_array($json) && !empty($json['crash']))) {
        fwrite(STDERR, "crashing mid-job\n");
        exit(1);
    }
    if ($data === 'hang') {
        while (true) {
            sleep(1);
        }
    }
    if ($data === 'exit111') {
        exit(111);
    }
    if (strncmp($data, 'grow:', 5) === 0) {
        $mib = (int) substr($data, 5);
        // str_repeat touches every page, so the memory shows in RSS.
        $kept[] = str_repeat('x', $mib * 1024 * 1024);
        $jobsDone++;
        return "grew {$mib}";
    }
    $jobsDone++;
    return strtoupper($data);
};
foreach ($functions as $f) {
    $worker->addFunction($f, $handler);
}

echo "worker ".getmypid()." ready: ".implode(' ', $functions)."\n";
while ($worker->work()) {
    if ($worker->returnCode() != GEARMAN_SUCCESS) {
        break;
    }
    if ($maxJobs > 0 && $jobsDone >= $maxJobs) {
        echo "max job count {$maxJobs} reached, exiting with 111\n";
        exit(111);
    }
}
fwrite(STDERR, "worker loop ended: ".$worker->error()."\n");
exit(1);
