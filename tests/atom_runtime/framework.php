<?php
// Test fixture (atomnode): the little of symfony 1.4 and AtoM that `php symfony tools:run`
// and a job need, written for atomnode's tests from how those classes behave; nothing here
// is AtoM's or symfony's code. atom_trees.add_runtime() copies it into a fixture tree as
// vendor/symfony/lib/fixture.php, with FIXTURE_FAMILY and FIXTURE_VERSION defined before.
// Each boot step is recorded in $GLOBALS['fixture_boot'] so tests can see who did what.

$GLOBALS['fixture_boot'] = array();

class sfConfig
{
    protected static $config = array();

    public static function get($name, $default = null)
    {
        return isset(self::$config[$name]) ? self::$config[$name] : $default;
    }

    public static function set($name, $value)
    {
        self::$config[$name] = $value;
    }

    public static function add($parameters = array())
    {
        self::$config = array_merge(self::$config, $parameters);
    }
}

class sfProjectConfiguration
{
    protected $environment;

    public function __construct($environment = 'test')
    {
        $this->environment = $environment;
        sfConfig::set('sf_root_dir', FIXTURE_ROOT);
    }

    public function getEnvironment()
    {
        return $this->environment;
    }

    public static function getApplicationConfiguration($application, $environment, $debug)
    {
        $class = $application.'Configuration';
        require_once FIXTURE_ROOT.'/apps/'.$application.'/config/'.$class.'.class.php';
        $GLOBALS['fixture_boot'][] = "configuration {$application}/{$environment}";

        return new $class($environment, $application);
    }
}

class sfApplicationConfiguration extends sfProjectConfiguration
{
    protected $application;

    public function __construct($environment, $application = 'qubit')
    {
        parent::__construct($environment);
        $this->application = $application;
    }

    public function getApplication()
    {
        return $this->application;
    }
}

class sfContext
{
    protected static $instance = null;
    protected $configuration;

    public static function createInstance(sfApplicationConfiguration $configuration)
    {
        $GLOBALS['fixture_boot'][] = 'context '.$configuration->getEnvironment();
        self::$instance = new sfContext();
        self::$instance->configuration = $configuration;

        return self::$instance;
    }

    public static function hasInstance()
    {
        return null !== self::$instance;
    }

    public static function getInstance()
    {
        if (null === self::$instance) {
            throw new Exception('The "default" context does not exist.');
        }

        return self::$instance;
    }

    public function getConfiguration()
    {
        return $this->configuration;
    }
}

class sfDatabaseManager
{
    public function __construct($configuration)
    {
        $GLOBALS['fixture_boot'][] = 'database';
    }
}

// The site's settings table (AtoM reads MySQL; the fixture reads config/settings.json).
class QubitSetting
{
    public static function getSettingsArray()
    {
        $GLOBALS['fixture_boot'][] = 'settings';
        $file = FIXTURE_ROOT.'/config/settings.json';

        return is_file($file) ? json_decode(file_get_contents($file), true) : array();
    }
}

class sfBaseTask
{
    protected $configuration;

    public function runFromCli($args)
    {
        // tools:run from 2.2 has an `application` option (default: the first app) and
        // `env` (default cli); 2.0-2.1 have neither, so the task's configuration is the
        // project's.
        if (version_compare(FIXTURE_VERSION, '2.2', '>=')) {
            $this->configuration = ProjectConfiguration::getApplicationConfiguration('qubit', 'cli', false);
        } else {
            $this->configuration = new ProjectConfiguration('test');
        }

        return $this->execute(array('filename' => $args[0]), array());
    }
}

class arBaseTask extends sfBaseTask
{
    protected $context;

    protected function execute($arguments = array(), $options = array())
    {
        // From 2.5 every task built on arBaseTask boots the context and the settings.
        $configuration = ProjectConfiguration::getApplicationConfiguration('qubit', 'cli', false);
        $this->context = sfContext::createInstance($configuration);
        sfConfig::add(QubitSetting::getSettingsArray());
    }
}

spl_autoload_register(function ($class) {
    $dirs = array('lib', 'lib/job', 'lib/model', 'lib/model/om', 'lib/task/tools', 'lib/task');
    foreach (glob(FIXTURE_ROOT.'/plugins/*/lib') as $d) {
        $dirs[] = substr($d, strlen(FIXTURE_ROOT) + 1);
    }
    foreach ($dirs as $dir) {
        foreach (array('.class.php', '.php') as $ext) {
            $file = FIXTURE_ROOT.'/'.$dir.'/'.$class.$ext;
            if (is_file($file)) {
                require_once $file;

                return;
            }
        }
    }
    if (0 === strpos($class, 'Net_Gearman')) {
        $file = FIXTURE_ROOT.'/vendor/net_gearman/'.str_replace('_', '/', $class).'.php';
        if (is_file($file)) {
            require_once $file;
        }
    }
});
