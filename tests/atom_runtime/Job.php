<?php
// Test fixture (atomnode): Net_Gearman's job classes as AtoM vendors them, written from
// their behaviour: the worker hands each job its connection (a socket of PHP's sockets
// extension) and the job's status(), complete() and fail() write request packets on it.
// The factory turns a function name into a class as FIXTURE_FAMILY's release does.

if (!defined('NET_GEARMAN_JOB_CLASS_PREFIX')) {
    define('NET_GEARMAN_JOB_CLASS_PREFIX', 'Net_Gearman_Job_');
}

class Net_Gearman_Exception extends Exception
{
}

class Net_Gearman_Job_Exception extends Net_Gearman_Exception
{
}

abstract class Net_Gearman_Job
{
    public static function factory($job, $conn, $handle, $initParams = array())
    {
        $class = NET_GEARMAN_JOB_CLASS_PREFIX.$job;
        if (in_array(FIXTURE_FAMILY, array('2.0.0-2.0.1', '2.0.2-2.1'))) {
            // no site prefix before 2.2
        } elseif ('2.2' === FIXTURE_FAMILY) {
            $class = str_replace(QubitJob::getJobPrefix(), '', $class);
        } else {
            $prefix = QubitJob::getJobPrefix();
            if (substr($class, 0, strlen($prefix)) === $prefix) {
                $class = substr($class, strlen($prefix));
            }
        }
        if (!class_exists($class)) {
            throw new Net_Gearman_Job_Exception('Invalid Job class');
        }
        $instance = new $class($conn, $handle, $initParams);
        if (!$instance instanceof Net_Gearman_Job_Common) {
            throw new Net_Gearman_Job_Exception('Job is of invalid type');
        }

        return $instance;
    }
}

abstract class Net_Gearman_Job_Common
{
    protected $handle = '';
    protected $conn = null;
    protected $initParams = array();

    public function __construct($conn, $handle, array $initParams = array())
    {
        $this->conn = $conn;
        $this->handle = $handle;
        $this->initParams = $initParams;
    }

    abstract public function run($arg);

    public function status($numerator, $denominator)
    {
        $this->send(12, array($this->handle, $numerator, $denominator));
    }

    public function complete(array $result)
    {
        $this->send(13, array($this->handle, json_encode($result)));
    }

    public function fail()
    {
        $this->send(14, array($this->handle));
    }

    protected function send($type, array $args)
    {
        $body = implode("\0", $args);
        $packet = "\0REQ".pack('NN', $type, strlen($body)).$body;
        while (strlen($packet)) {
            $n = socket_write($this->conn, $packet);
            if (false === $n) {
                throw new Net_Gearman_Exception('socket_write failed');
            }
            $packet = substr($packet, $n);
        }
    }
}
