<?php
// Test fixture (atomnode): a job class for the per-job runner's tests. The workload is
// AtoM-like JSON: {"id": <AtoM job id>, "do": <what>, ...}.
class arFixtureJob extends Net_Gearman_Job_Common
{
    public function run($arg)
    {
        $do = is_array($arg) && isset($arg['do']) ? $arg['do'] : 'echo';
        echo "arFixtureJob {$do} for AtoM job ".(is_array($arg) && isset($arg['id']) ? $arg['id'] : '-')."\n";
        switch ($do) {
            case 'boot':
                return array(
                    'class' => get_class($this),
                    'boot' => $GLOBALS['fixture_boot'],
                    'env' => sfContext::getInstance()->getConfiguration()->getEnvironment(),
                    'title' => sfConfig::get('app_siteTitle'),
                    'prefix_constant' => NET_GEARMAN_JOB_CLASS_PREFIX,
                    'arg' => $arg,
                );
            case 'status':
                $this->status(1, 3);
                $this->status(2, 3);

                return 'counted';
            case 'data':
                // Net_Gearman's job class has no data(); a job may still write the packet.
                $this->send(28, array($this->handle, 'partial output'));

                return 'sent';
            case 'fail':
                throw new Net_Gearman_Job_Exception('the fixture job failed on purpose');
            case 'throw':
                throw new RuntimeException('unexpected trouble in the fixture job');
            case 'fatal':
                ini_set('memory_limit', '32M');
                $a = array();
                while (true) {
                    $a[] = str_repeat('y', 1024 * 1024);
                }
            case 'exit':
                fwrite(STDERR, "leaving without a result\n");
                exit(3);
            case 'hang':
                file_put_contents($arg['marker'], 'running');
                while (true) {
                    sleep(60);
                }
            case 'grow':
                $kept = str_repeat('x', $arg['mib'] * 1024 * 1024);
                file_put_contents($arg['marker'], 'grown');
                while (true) {
                    sleep(60);
                }
            case 'wait':
                // Blocks until the test writes a line into the FIFO.
                file_put_contents($arg['marker'], 'waiting');
                $line = trim(fgets(fopen($arg['fifo'], 'r')));

                return array('released' => $line);
            case 'pid':
                return array('pid' => getmypid());
            case 'who':
                $pw = posix_getpwuid(posix_geteuid());

                return array('user' => $pw['name'], 'cwd' => getcwd(), 'pgid' => posix_getpgid(0),
                             'pid' => getmypid(), 'owner' => getenv('ATOMNODE_OWNER') ? 'set' : 'unset');
            default:
                return $arg;
        }
    }
}
