<?php
/*
 * atomnode's per-job runner for AtoM: runs ONE job of an AtoM site, then exits.
 *
 * atomnode starts it for each job as
 *
 *     php -d memory_limit=-1 symfony tools:run /path/to/atom-job-runner.php
 *
 * in the site's root, as the site's user. `tools:run` (every AtoM 2.x) includes this file
 * inside its execute() method, so `$this` is the task. The runner then does what AtoM's
 * worker task (jobs:worker from 2.2, tools:gearman-worker in 2.0-2.1) does before its
 * worker loop, and what Net_Gearman's worker does for one job:
 *
 *  - boot: from AtoM 2.5, tools:run's base class (arBaseTask) has created the symfony
 *    context and loaded the site's settings into sfConfig already. Before 2.5 it has not:
 *    2.2-2.4 create a context but load no settings, 2.0-2.1 only open the database.
 *    The runner creates what is missing the way the worker task does (application
 *    "qubit", environment "worker"; sfConfig::add(QubitSetting::getSettingsArray())),
 *    and, as the worker task does, sets Net_Gearman's job class prefix to ''.
 *  - the job: it reads one JOB_ASSIGN packet (handle, function, workload) from atomnode's
 *    channel, decodes the workload as Net_Gearman's worker does (JSON to an array, else
 *    the raw string), and creates the job object with the release's own
 *    Net_Gearman_Job::factory(), which strips the site's job prefix from the function
 *    name (QubitJob::getJobPrefix()) as that release does. The job gets the channel as
 *    its connection: its status(), complete() and fail() write real Gearman packets on it.
 *  - run() returns: complete() with the result (an array, else array('result' => ...)),
 *    as Net_Gearman's worker does. run() throws Net_Gearman_Job_Exception: the job's
 *    fail(), with the message sent first. Anything else thrown, or a fatal error:
 *    WORK_EXCEPTION with the message (where AtoM's worker process would die).
 *
 * The channel is a Unix socket in the abstract namespace named by $ATOMNODE_CHANNEL
 * (atomnode accepts one connection, from this process only). Besides the job's own
 * packets the runner sends ECHO_REQ "atomnode-runner started <unix time>" when it is about
 * to call run() (atomnode measures the start-up cost with it) and ECHO_REQ
 * "atomnode-runner error <message>" before a fail().
 *
 * Written for atomnode from the behaviour of AtoM's and Net_Gearman's code; plain PHP 5.3
 * syntax, so it runs on every PHP an AtoM 2.x release supports.
 */

if (!function_exists('atomnode_runner_packet')) {
    function atomnode_runner_packet($type, $args)
    {
        $body = implode("\0", $args);

        return "\0REQ".pack('NN', $type, strlen($body)).$body;
    }

    function atomnode_runner_write($sock, $data)
    {
        $len = strlen($data);
        $done = 0;
        while ($done < $len) {
            $n = socket_write($sock, substr($data, $done), $len - $done);
            if (false === $n) {
                return false;
            }
            $done += $n;
        }

        return true;
    }

    function atomnode_runner_read($sock, $len)
    {
        $out = '';
        while (strlen($out) < $len) {
            $chunk = socket_read($sock, $len - strlen($out), PHP_BINARY_READ);
            if (false === $chunk || '' === $chunk) {
                return false;
            }
            $out .= $chunk;
        }

        return $out;
    }

    function atomnode_runner_fail_early($message)
    {
        fwrite(STDERR, "atomnode-runner: {$message}\n");
        exit(70);
    }
}

$atomnodeChannel = getenv('ATOMNODE_CHANNEL');
if (!$atomnodeChannel) {
    atomnode_runner_fail_early('ATOMNODE_CHANNEL is not set: this script is started by atomnode for one job');
}
if (!function_exists('socket_create')) {
    atomnode_runner_fail_early("PHP's sockets extension is missing (Net_Gearman needs it too)");
}
$atomnodeSocket = socket_create(AF_UNIX, SOCK_STREAM, 0);
if (!$atomnodeSocket || !@socket_connect($atomnodeSocket, "\0".$atomnodeChannel)) {
    atomnode_runner_fail_early('cannot connect to atomnode: '.socket_strerror(socket_last_error()));
}

// The job: JOB_ASSIGN (type 11) = handle \0 function \0 workload.
$atomnodeHeader = atomnode_runner_read($atomnodeSocket, 12);
if (false === $atomnodeHeader || "\0RES" !== substr($atomnodeHeader, 0, 4)) {
    atomnode_runner_fail_early('no job from atomnode');
}
$atomnodeHead = unpack('Ntype/Nsize', substr($atomnodeHeader, 4));
$atomnodeBody = $atomnodeHead['size'] > 0 ? atomnode_runner_read($atomnodeSocket, $atomnodeHead['size']) : '';
if (11 != $atomnodeHead['type'] || false === $atomnodeBody) {
    atomnode_runner_fail_early('no job from atomnode');
}
$atomnodeParts = explode("\0", $atomnodeBody, 3);
if (3 != count($atomnodeParts)) {
    atomnode_runner_fail_early('malformed job from atomnode');
}
list($atomnodeHandle, $atomnodeFunction, $atomnodeWorkload) = $atomnodeParts;
$GLOBALS['atomnode_runner'] = array('socket' => $atomnodeSocket, 'handle' => $atomnodeHandle, 'ended' => false);

// A fatal error (memory, a parse error in a job class...) still reports its message.
register_shutdown_function(function () {
    $state = $GLOBALS['atomnode_runner'];
    if ($state['ended']) {
        return;
    }
    @ini_set('memory_limit', '-1');  // a job that ran out of memory still reports it
    $error = error_get_last();
    if (!$error || !($error['type'] & (E_ERROR | E_PARSE | E_CORE_ERROR | E_COMPILE_ERROR | E_USER_ERROR))) {
        return;  // exit() without a result: atomnode reports the exit status and output
    }
    $message = "PHP fatal error: {$error['message']} in {$error['file']}:{$error['line']}";
    atomnode_runner_write($state['socket'], atomnode_runner_packet(25, array($state['handle'], $message)));
});

try {
    // Boot as the worker task does, where this release's tools:run has not.
    $atomnodeBooted = isset($this) && isset($this->context) && $this->context instanceof sfContext;
    if (!$atomnodeBooted) {
        if (!sfContext::hasInstance()) {
            $atomnodeConfiguration = ProjectConfiguration::getApplicationConfiguration('qubit', 'worker', false);
            sfContext::createInstance($atomnodeConfiguration);
        }
        sfConfig::add(QubitSetting::getSettingsArray());
    }
    if (!defined('NET_GEARMAN_JOB_CLASS_PREFIX')) {
        define('NET_GEARMAN_JOB_CLASS_PREFIX', '');
    }

    $atomnodeArg = array();
    if (strlen($atomnodeWorkload)) {
        $atomnodeArg = json_decode($atomnodeWorkload, true);
        if (null === $atomnodeArg) {
            $atomnodeArg = $atomnodeWorkload;
        }
    }

    $atomnodeJob = Net_Gearman_Job::factory($atomnodeFunction, $atomnodeSocket, $atomnodeHandle, array());

    atomnode_runner_write($atomnodeSocket, atomnode_runner_packet(16, array(
        'atomnode-runner started '.sprintf('%.6f', microtime(true)), )));
    try {
        $atomnodeResult = $atomnodeJob->run($atomnodeArg);
        if (!is_array($atomnodeResult)) {
            $atomnodeResult = array('result' => $atomnodeResult);
        }
        $atomnodeJob->complete($atomnodeResult);
    } catch (Net_Gearman_Job_Exception $e) {
        fwrite(STDERR, 'Job failed: '.$e->getMessage()."\n");
        atomnode_runner_write($atomnodeSocket, atomnode_runner_packet(16, array(
            'atomnode-runner error '.$e->getMessage(), )));
        $atomnodeJob->fail();
    }
    $GLOBALS['atomnode_runner']['ended'] = true;
} catch (Exception $e) {
    $GLOBALS['atomnode_runner']['ended'] = true;
    $atomnodeMessage = get_class($e).': '.$e->getMessage();
    fwrite(STDERR, "{$atomnodeMessage} in {$e->getFile()}:{$e->getLine()}\n");
    atomnode_runner_write($atomnodeSocket, atomnode_runner_packet(25, array($atomnodeHandle, $atomnodeMessage)));
} catch (Error $e) {
    // PHP 7+: errors are thrown too (a PHP 5 never gets here).
    $GLOBALS['atomnode_runner']['ended'] = true;
    $atomnodeMessage = get_class($e).': '.$e->getMessage();
    fwrite(STDERR, "{$atomnodeMessage} in {$e->getFile()}:{$e->getLine()}\n");
    atomnode_runner_write($atomnodeSocket, atomnode_runner_packet(25, array($atomnodeHandle, $atomnodeMessage)));
}
socket_close($atomnodeSocket);
